// Command kstatus computes the kstatus status (sigs.k8s.io/cli-utils/pkg/kstatus/status,
// the library Flux, kpt and `kubectl apply --prune` status readers use) of the
// Kubernetes objects it reads, so tests can check a controller's status against the
// real conventions instead of a re-implementation of them.
//
// Input on stdin: a JSON array of objects. Output on stdout: a JSON array with one
// {"status", "message", "conditions"} per object, in order. Exit 1 with a message on
// stderr when the input cannot be read or an object's status cannot be computed.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type result struct {
	Status     string             `json:"status"`
	Message    string             `json:"message"`
	Conditions []status.Condition `json:"conditions"`
}

func run(in io.Reader, out io.Writer) error {
	data, err := io.ReadAll(in)
	if err != nil {
		return fmt.Errorf("reading stdin: %w", err)
	}
	// apimachinery's decoder keeps integers as int64, as the API machinery does
	// (encoding/json's float64 fails the accessors kstatus uses).
	var objects []map[string]interface{}
	if err := utiljson.Unmarshal(data, &objects); err != nil {
		return fmt.Errorf("reading a JSON array of objects from stdin: %w", err)
	}
	results := make([]result, 0, len(objects))
	for i, object := range objects {
		computed, err := status.Compute(&unstructured.Unstructured{Object: object})
		if err != nil {
			return fmt.Errorf("object %d: %w", i, err)
		}
		results = append(results, result{
			Status:     computed.Status.String(),
			Message:    computed.Message,
			Conditions: computed.Conditions,
		})
	}
	return json.NewEncoder(out).Encode(results)
}

func main() {
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus:", err)
		os.Exit(1)
	}
}
