// Package agentsim simulates the host agents of many sandbox hosts in one
// process, and the part of the control plane that talks to them: it
// registers the hosts in the control plane's hosts table, writes their
// heartbeats, and optionally churns sandboxes through the control plane's
// status transitions. It is the fixture for vigil's tests, demos and
// benchmarks (SPEC §4).
//
// # Addressing
//
// One HTTP/1.1 listener (Config.ListenAddr, a wildcard address such as
// "0.0.0.0:0") serves every host. Host i has its own loopback address
// 127.(1+i/65024).((i/254)%256).(1+i%254) — 127.1.0.1, 127.1.0.2, ... —
// on the listener's port, and hosts.address holds that "ip:port". Linux
// routes all of 127.0.0.0/8 to lo, so no setup is needed; a socket bound to
// 127.0.0.1 would not receive them, hence the wildcard. The server tells the
// hosts apart by the connection's local address, and closes at once any
// connection to an address that is not one of its hosts (another interface,
// 127.0.0.1), so nothing but its hosts is reachable through the wildcard.
// 10,000 hosts cost one listening socket plus one per open client connection.
//
// # Agent RPC
//
// hostagent.v1.HostAgentService over Connect, HTTP/1.1 only.
// ListSandboxes reports every VM on the host (sandbox_id "cl-...", status,
// team_id, template, vcpus, memory_mb, host_ip, timestamps), ordered by id.
// DestroySandbox removes a VM and answers not_found for an unknown one.
// Fencing: a "Vigil-Fence: <shard>:<token>" header (decimal) is checked
// against the highest token the host has seen; a lower token is rejected
// with failed_precondition and changes nothing, a malformed header with
// invalid_argument, a missing header is accepted and logged. Every call is
// recorded: Destroys (accepted) and RejectedDestroys.
//
// # Fault modes
//
// Each host has a Mode, settable at any time with SetMode: healthy, dead,
// hang, slow, flap, malformed, oversized, unknown-status, duplicate-ids (see
// the Kind constants). Restart is an action: every VM but the paused ones
// disappears. AddVM, SetVMStatus, RemoveVM and VMs manipulate the agent's
// state directly, without touching the database.
//
// # Database
//
// Run upserts every host as ('regular', online, address, last_heartbeat_at
// = now()), with team_id NULL for a SharedFraction of them, and seeds
// SandboxesPerHost running sandboxes per host (row and VM). Every
// HeartbeatInterval, and on demand through Heartbeat, one statement sets
// last_heartbeat_at = now() and unreachable → online for the hosts whose
// mode heartbeats (not dead, not flap in its dead phase, not
// SkipHeartbeat). Churn (ChurnPerSecond) drives sandboxes through create,
// pause, resume, snapshot and destroy; every row change is a compare-and-set
// on the previous status with last_updated = now(), as the control plane
// does, and the agent's VM changes between the database steps.
//
// # Control API
//
// AdminHandler serves a small JSON API (cmd/agentsim mounts it on
// --admin-addr). A host id is its UUID or "host-..." id; a sandbox id is a
// UUID or "cl-..." id. Errors are {"error": "..."} with 400, 404 or 500.
//
//	GET    /hosts                      every host: id, address, team_id, mode, vms, highest_fence
//	GET    /hosts/{id}                 one host
//	POST   /hosts/{id}/mode            set the mode; body e.g. {"kind":"slow","delay":"3s"},
//	                                   {"kind":"flap","period":"10s"}, {"kind":"oversized","oversize_bytes":8388608},
//	                                   {"kind":"unknown-status","label":"hibernating"},
//	                                   {"kind":"healthy","skip_heartbeat":true}; answers the host
//	POST   /hosts/{id}/restart         agent restart; answers {"dropped": n}
//	GET    /hosts/{id}/vms             the agent's VMs
//	POST   /hosts/{id}/vms             add or replace a VM: {"id":"cl-...","status":"paused","team_id":"<uuid>"}
//	DELETE /hosts/{id}/vms/{sandbox}   remove a VM (204)
//	GET    /hosts/{id}/destroys        {"accepted":[...],"rejected":[...]} DestroySandbox records
//	POST   /heartbeat                  one heartbeat round now; answers {"hosts": n}
package agentsim
