package agentsim

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/internal/ids"
)

// AdminHandler is the control API described in the package documentation.
// It is meant for a separate, loopback-only listener.
func (s *Sim) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /hosts", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.Hosts())
	})
	mux.HandleFunc("GET /hosts/{id}", s.withHost(func(w http.ResponseWriter, r *http.Request, id uuid.UUID) {
		hi, err := s.Host(id)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, hi)
	}))
	mux.HandleFunc("POST /hosts/{id}/mode", s.withHost(func(w http.ResponseWriter, r *http.Request, id uuid.UUID) {
		var m Mode
		if err := decodeJSON(r, &m); err != nil {
			writeError(w, err)
			return
		}
		if err := s.SetMode(id, m); err != nil {
			writeError(w, badRequest(err))
			return
		}
		hi, _ := s.Host(id)
		writeJSON(w, http.StatusOK, hi)
	}))
	mux.HandleFunc("POST /hosts/{id}/restart", s.withHost(func(w http.ResponseWriter, r *http.Request, id uuid.UUID) {
		n, err := s.Restart(id)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]int{"dropped": n})
	}))
	mux.HandleFunc("GET /hosts/{id}/vms", s.withHost(func(w http.ResponseWriter, r *http.Request, id uuid.UUID) {
		writeJSON(w, http.StatusOK, s.VMs(id))
	}))
	mux.HandleFunc("POST /hosts/{id}/vms", s.withHost(func(w http.ResponseWriter, r *http.Request, id uuid.UUID) {
		var body struct {
			ID     string    `json:"id"`
			Status string    `json:"status"`
			TeamID uuid.UUID `json:"team_id"`
		}
		if err := decodeJSON(r, &body); err != nil {
			writeError(w, err)
			return
		}
		sid, err := parseSandboxID(body.ID)
		if err != nil {
			writeError(w, err)
			return
		}
		if body.Status == "" {
			writeError(w, badRequest(errors.New("status is required")))
			return
		}
		if err := s.AddVM(id, sid, body.Status, body.TeamID); err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, s.VMs(id))
	}))
	mux.HandleFunc("DELETE /hosts/{id}/vms/{sandbox}", s.withHost(func(w http.ResponseWriter, r *http.Request, id uuid.UUID) {
		sid, err := parseSandboxID(r.PathValue("sandbox"))
		if err != nil {
			writeError(w, err)
			return
		}
		if err := s.RemoveVM(id, sid); err != nil {
			writeError(w, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}))
	mux.HandleFunc("GET /hosts/{id}/destroys", s.withHost(func(w http.ResponseWriter, r *http.Request, id uuid.UUID) {
		writeJSON(w, http.StatusOK, map[string][]DestroyRecord{
			"accepted": nonNil(s.Destroys(id)),
			"rejected": nonNil(s.RejectedDestroys(id)),
		})
	}))
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]int64{
			"in_flight":           int64(s.InFlight()),
			"full_tls_handshakes": s.FullHandshakes(),
		})
	})
	mux.HandleFunc("POST /heartbeat", func(w http.ResponseWriter, r *http.Request) {
		n, err := s.Heartbeat(r.Context())
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]int{"hosts": n})
	})
	return mux
}

type httpError struct {
	code int
	err  error
}

func (e *httpError) Error() string { return e.err.Error() }
func (e *httpError) Unwrap() error { return e.err }

func badRequest(err error) error { return &httpError{http.StatusBadRequest, err} }

func (s *Sim) withHost(f func(http.ResponseWriter, *http.Request, uuid.UUID)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		raw := r.PathValue("id")
		id, err := uuid.Parse(raw)
		if err != nil {
			id, err = ids.ParseHost(raw)
		}
		if err != nil {
			writeError(w, badRequest(fmt.Errorf("host id %q: want a UUID or host-... id", raw)))
			return
		}
		if _, err := s.host(id); err != nil {
			writeError(w, err)
			return
		}
		f(w, r, id)
	}
}

func parseSandboxID(raw string) (uuid.UUID, error) {
	if strings.HasPrefix(raw, ids.SandboxPrefix) {
		id, err := ids.ParseSandbox(raw)
		if err != nil {
			return id, badRequest(err)
		}
		return id, nil
	}
	id, err := uuid.Parse(raw)
	if err != nil {
		return id, badRequest(fmt.Errorf("sandbox id %q: want a UUID or cl-... id", raw))
	}
	return id, nil
}

func decodeJSON(r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return badRequest(fmt.Errorf("request body: %w", err))
	}
	return nil
}

func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func writeError(w http.ResponseWriter, err error) {
	code := http.StatusInternalServerError
	var he *httpError
	switch {
	case errors.As(err, &he):
		code = he.code
	case errors.Is(err, ErrUnknownHost), errors.Is(err, ErrUnknownSandbox):
		code = http.StatusNotFound
	case errors.Is(err, ErrNoDatabase):
		code = http.StatusConflict
	}
	writeJSON(w, code, map[string]string{"error": err.Error()})
}
