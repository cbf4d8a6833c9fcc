"""Lab code a node daemon never runs: the test hosts (testbed, net, proc), the pods'
servers (podserver), real-connection probes (probe), the demo and its bundled example."""
