// Command coredns is CoreDNS (github.com/coredns/coredns) built with only the
// plugins a test cluster's DNS needs: kubernetes (Service and Pod records from the
// API server), bind (listen on one address: several clusters share a machine),
// ready (when the kubernetes plugin has synced), errors and log.
//
// CoreDNS selects plugins at compile time. Its own main imports every plugin in
// plugin.cfg (core/plugin), which pulls in the SDKs of every cloud DNS provider.
// This main does what core/dnsserver's package documentation describes for a host
// that picks its plugins: import only those, set their execution order with
// dnsserver.SetDirectives, and run coremain (flags, signals, the Corefile) like the
// stock binary.
package main

import (
	"fmt"
	"os"

	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	// The plugins this build registers; each registers itself in its init.
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// directives is the stock execution order (core/dnsserver/zdirectives.go)
// restricted to the plugins imported above.
var directives = []string{"bind", "ready", "errors", "log", "kubernetes"}

func main() {
	if err := dnsserver.SetDirectives(directives); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	coremain.Run()
}
