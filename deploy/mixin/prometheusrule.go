package main

import (
	"bytes"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"github.com/prometheus/prometheus/model/rulefmt"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"
)

// renderPrometheusRule embeds the rendered rules in a PrometheusRule for the
// Prometheus operator: the same groups, rule for rule, as Prometheus loads
// them from the rules file (which promtool tests).
func (m *mixin) renderPrometheusRule(groups *rulefmt.RuleGroups) ([]byte, error) {
	pr := &monitoringv1.PrometheusRule{
		TypeMeta: metav1.TypeMeta{APIVersion: "monitoring.coreos.com/v1", Kind: "PrometheusRule"},
		ObjectMeta: metav1.ObjectMeta{
			Name: "vigil",
			// release: the label a kube-prometheus-stack Prometheus selects
			// rules by, as it selects the PodMonitor beside this file.
			Labels: map[string]string{"app.kubernetes.io/name": "vigil", "release": "prometheus"},
		},
	}
	for _, g := range groups.Groups {
		mg := monitoringv1.RuleGroup{Name: g.Name}
		if g.Interval != 0 {
			d := monitoringv1.Duration(g.Interval.String())
			mg.Interval = &d
		}
		for _, r := range g.Rules {
			mr := monitoringv1.Rule{Record: r.Record, Alert: r.Alert, Expr: intstr.FromString(r.Expr), Labels: r.Labels, Annotations: r.Annotations}
			if r.For != 0 {
				d := monitoringv1.Duration(r.For.String())
				mr.For = &d
			}
			mg.Rules = append(mg.Rules, mr)
		}
		pr.Spec.Groups = append(pr.Spec.Groups, mg)
	}
	b, err := yaml.Marshal(pr)
	if err != nil {
		return nil, err
	}
	// An object never stored has no creation time; the field only confuses.
	b = bytes.ReplaceAll(b, []byte("  creationTimestamp: null\n"), nil)
	return append([]byte(m.header(rulesSource)), b...), nil
}
