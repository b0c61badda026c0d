package deploy

import (
	"errors"
	"fmt"

	sigsjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// unmarshalStrict decodes YAML the way the Kubernetes API server decodes a
// strictly validated request: duplicate keys, unknown fields and fields that
// match a known one only case-insensitively (readOnlyRootFileSystem) are
// errors. encoding/json, and so yaml.UnmarshalStrict, would accept the last.
func unmarshalStrict(doc []byte, obj any) error {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return err
	}
	strictErrs, err := sigsjson.UnmarshalStrict(j, obj)
	if err != nil {
		return err
	}
	if len(strictErrs) > 0 {
		return fmt.Errorf("strict decoding: %w", errors.Join(strictErrs...))
	}
	return nil
}
