package store

// ReadHostsSQL is ReadHosts' statement, for the plan test.
const ReadHostsSQL = readHostsSQL
