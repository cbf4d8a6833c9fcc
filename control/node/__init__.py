"""The node daemon: settings (config), sources of cluster state, the store, the control
loop (daemon), the REST endpoint (api) and metrics."""
