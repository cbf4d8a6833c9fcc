"""Settings of the test hosts, in one place: address ranges, names, paths and timeouts.

Everything ``mcnp testbed``, the CNI runner, the pod lifecycle and the Service
translation agree on lives here, so that a pod added later by hand (docs/interfaces.md)
and a pod added by ``testbed up`` see the same world. Test hosts use addresses in
198.18.0.0/15 only; two blocks at its top are reserved and refused as pod addresses:

* ``NODE_NET`` (198.19.255.0/24): node *i* of the testbed owns 198.19.255.(i+1) on the
  core segment; it is also the gateway its pods route through (passed to static IPAM as
  ``GATEWAY=`` in the node's ``cni_args``).
* ``SERVICE_NET`` (198.19.254.0/24): Service ClusterIPs. Pods reach it through their
  node (a static IPAM route via the gateway), where kube-proxy's translation waits.

Environment variables (all optional) move the state directory (``MCNP_TESTBED_DIR``), the
namespace name prefix (``MCNP_TESTBED_PREFIX``) and the directory the reference CNI
plugins are linked from (``MCNP_CNI_PLUGIN_DIR``).
"""

from __future__ import annotations

import ipaddress
import logging
import os

logger = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/run/mcnp/testbed"
DEFAULT_PREFIX = "mcnp-"
#: Debian's containernetworking-plugins.
DEFAULT_CNI_PLUGIN_DIR = "/usr/lib/cni"

#: The only addresses test hosts may use (docs/architecture.md, Test hosts).
POD_NET = ipaddress.ip_network("198.18.0.0/15")
NODE_NET = ipaddress.ip_network("198.19.255.0/24")
SERVICE_NET = ipaddress.ip_network("198.19.254.0/24")
RESERVED = (NODE_NET, SERVICE_NET)
#: Every pod's address is passed as IP=ADDR/POD_PREFIX_LEN: the whole test range, so the
#: bridged CNI puts every pod of every node on one L2 segment and the routed one sends
#: all of it through the node.
POD_PREFIX_LEN = POD_NET.prefixlen

#: The reference plugins a configuration list may use, and the IPAM they call.
CNIS = ("ptp", "bridge")
IPAM = "static"
CNI_VERSION = "1.0.0"
#: The bridge the ``bridge`` CNI builds in each node (it enslaves the node's uplink).
CNI_BRIDGE = "cni0"
#: Name of the configuration list and of the network it declares.
NETWORK_NAME = "mcnp-testbed"
#: The chained plugin of mode mcnp; built beside the daemon's package.
MCNP_CNI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "node", "mcnp-cni")

MODES = ("mcnp", "none")
#: Interface names: the node's uplink, its peer in the core, and the core's bridge.
UPLINK = "uplink"
CORE_BRIDGE = "br0"
#: The daemons' REST endpoint inside each node netns (their own loopback).
API_LISTEN = "127.0.0.1:9901"

#: Seconds: a daemon's grace to detach after SIGTERM; a pod server's; one CNI plugin
#: call; a pod server's start; links coming up.
DAEMON_GRACE = 5.0
SERVER_GRACE = 1.0
PLUGIN_TIMEOUT = 30.0
SERVER_START_TIMEOUT = 30.0
LINK_TIMEOUT = 10.0
#: Pods whose CNI ADD runs at once during ``up`` (each runs two plugin processes).
ADD_CONCURRENCY = 4

#: Node sysctls: forward IP (kubeadm's preflight demands it), let the bridge hand
#: frames to iptables (kube-proxy needs it with a bridged CNI), answer ARP on the core
#: segment for the node's own pods at once (routed CNI), and no IPv6: test hosts carry
#: IPv4 only, so no router solicitations wander between the hosts.
NO_IPV6 = {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1"}
NODE_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.bridge.bridge-nf-call-iptables": "1",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
    **NO_IPV6,
}


def state_dir_default() -> str:
    """The state directory; ``MCNP_TESTBED_DIR`` moves it (tests use their own)."""
    return os.environ.get("MCNP_TESTBED_DIR", DEFAULT_STATE_DIR)


def prefix_default() -> str:
    """The namespace name prefix; ``MCNP_TESTBED_PREFIX`` changes it, so a test's
    testbed never meets a demo's."""
    return os.environ.get("MCNP_TESTBED_PREFIX", DEFAULT_PREFIX)


def cni_plugin_dir() -> str:
    return os.environ.get("MCNP_CNI_PLUGIN_DIR", DEFAULT_CNI_PLUGIN_DIR)


def reserved_block(ip: ipaddress.IPv4Address):
    """The reserved block holding ``ip``, or None."""
    return next((net for net in RESERVED if ip in net), None)
