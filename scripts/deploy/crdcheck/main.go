// crdcheck decodes the custom resources of rendered manifests strictly into the
// Go types of their projects (Prometheus Operator ServiceMonitor/PrometheusRule,
// Gateway API HTTPRoute): unknown fields and wrong types fail. kubernetes-validate
// has no schemas for these kinds.
//
// Usage: crdcheck MANIFESTS.yaml...
package main

import (
	"bytes"
	"fmt"
	"io"
	"os"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	yamlutil "k8s.io/apimachinery/pkg/util/yaml"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"
)

type typeMeta struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name string `json:"name"`
	} `json:"metadata"`
}

func check(doc []byte) (string, error) {
	var tm typeMeta
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return "", err
	}
	id := fmt.Sprintf("%s %s/%s", tm.APIVersion, tm.Kind, tm.Metadata.Name)
	var obj any
	switch tm.APIVersion + "/" + tm.Kind {
	case "monitoring.coreos.com/v1/ServiceMonitor":
		obj = &monitoringv1.ServiceMonitor{}
	case "monitoring.coreos.com/v1/PrometheusRule":
		obj = &monitoringv1.PrometheusRule{}
	case "gateway.networking.k8s.io/v1/HTTPRoute":
		obj = &gatewayv1.HTTPRoute{}
	default:
		return "", nil
	}
	if err := yaml.UnmarshalStrict(doc, obj); err != nil {
		return id, err
	}
	if errs := validation.IsDNS1123Subdomain(tm.Metadata.Name); len(errs) > 0 {
		return id, fmt.Errorf("metadata.name: %v", errs)
	}
	return id, nil
}

func main() {
	failed, checked := false, 0
	for _, path := range os.Args[1:] {
		data, err := os.ReadFile(path)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		r := yamlutil.NewYAMLReader(bufioReader(data))
		for {
			doc, err := r.Read()
			if err == io.EOF {
				break
			}
			if err != nil {
				fmt.Fprintf(os.Stderr, "%s: %v\n", path, err)
				os.Exit(2)
			}
			if len(bytes.TrimSpace(doc)) == 0 {
				continue
			}
			id, err := check(doc)
			if id == "" && err == nil {
				continue
			}
			checked++
			if err != nil {
				failed = true
				fmt.Fprintf(os.Stderr, "FAIL %s: %s: %v\n", path, id, err)
			} else {
				fmt.Printf("ok   %s: %s\n", path, id)
			}
		}
	}
	if failed {
		os.Exit(1)
	}
	fmt.Printf("crdcheck: %d custom resources decoded strictly\n", checked)
}
