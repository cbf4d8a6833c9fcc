"""A container runtime's CNI side: run a node's configuration list plugin by plugin.

This is what libcni does inside containerd or CRI-O, and nothing more: read the one
``*.conflist`` of a node's configuration directory, then for ADD call each plugin in
order with the network's ``name`` and ``cniVersion`` added to its configuration and, from
the second plugin on, the previous plugin's result as ``prevResult``; DEL walks the list in reverse, CHECK in
order, both with the cached ADD result as ``prevResult``. Each
plugin runs inside the node's network namespace with ``CNI_COMMAND``,
``CNI_CONTAINERID``, ``CNI_NETNS``, ``CNI_IFNAME``, ``CNI_PATH`` and ``CNI_ARGS``
(docs/interfaces.md, Adding a pod by hand). A failed ADD is rolled back with a DEL of the whole list, as a
runtime tears a failed sandbox down. Unlike libcni, DEL goes on past a failing plugin so
that a test host is always cleaned up; the first failure is raised at the end.

A node is described by the mapping ``mcnp testbed up --json`` prints for it (``netns``,
``cni_conf_dir``, ``cni_bin_dir``, ``pod_prefix_len``, ``cni_args``): that mapping is
all a caller needs to add a pod.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import subprocess
from typing import Mapping, Optional

from control.lab.layout import PLUGIN_TIMEOUT
from control.lab.net import NETNS_DIR, NetError, popen_in

logger = logging.getLogger(__name__)

IFNAME = "eth0"


class CniError(Exception):
    """A plugin failed (its CNI error JSON, or how it died), or the list is unusable."""

    def __init__(self, message: str, code: Optional[int] = None):
        super().__init__(message)
        self.code = code


def load_conflist(conf_dir: str) -> dict:
    """The one ``*.conflist`` of ``conf_dir``, checked for the fields a runtime needs."""
    found = sorted(glob.glob(os.path.join(conf_dir, "*.conflist")))
    if len(found) != 1:
        raise CniError(f"{conf_dir}: want exactly one *.conflist, found {len(found)}")
    try:
        with open(found[0]) as f:
            conf = json.load(f)
    except (OSError, ValueError) as e:
        raise CniError(f"{found[0]}: cannot be read: {e}") from None
    plugins = conf.get("plugins") if isinstance(conf, dict) else None
    if not isinstance(plugins, list) or not plugins or not all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in plugins):
        raise CniError(f"{found[0]}: plugins: want a non-empty list of objects with a type")
    for key in ("name", "cniVersion"):
        if not isinstance(conf.get(key), str):
            raise CniError(f"{found[0]}: {key}: missing")
    return conf


def pod_args(namespace: str, name: str, container_id: str, ip: str, prefix_len: int, node_args: str = "") -> str:
    """``CNI_ARGS`` for a pod, as docs/interfaces.md spells them."""
    args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={container_id};IP={ip}/{prefix_len}"
    return f"{args};{node_args}" if node_args else args


def netns_path(netns: str) -> str:
    return netns if netns.startswith("/") else os.path.join(NETNS_DIR, netns)


def _cache_file(cache_dir: str, network: str, container_id: str, ifname: str) -> str:
    return os.path.join(cache_dir, f"{network}-{container_id}-{ifname}.json")


def _invoke(node: Mapping, plugin: dict, conf: dict, command: str, env: dict, prev: Optional[dict]) -> Optional[dict]:
    """One plugin call in the node's namespace; its parsed result (None for DEL)."""
    stdin = dict(plugin, name=conf["name"], cniVersion=conf["cniVersion"])
    if prev is not None:
        stdin["prevResult"] = prev
    exe = os.path.join(node["cni_bin_dir"], plugin["type"])
    if not os.access(exe, os.X_OK):
        raise CniError(f"plugin {plugin['type']}: no executable {exe}")
    try:
        proc = popen_in(node["netns"], [exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    except (NetError, OSError) as e:
        raise CniError(f"plugin {plugin['type']}: cannot start: {e}") from None
    try:
        out, err = proc.communicate(json.dumps(stdin).encode(), timeout=PLUGIN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise CniError(f"plugin {plugin['type']} {command}: no answer within {PLUGIN_TIMEOUT:.0f} s") from None
    what = f"plugin {plugin['type']} {command} for {env['CNI_CONTAINERID']}"
    try:
        answer = json.loads(out) if out.strip() else None
    except ValueError:
        answer = None
    if proc.returncode != 0:
        if isinstance(answer, dict) and "msg" in answer:
            detail = f"{answer['msg']}" + (f" ({answer['details']})" if answer.get("details") else "")
            raise CniError(f"{what} failed: code {answer.get('code')}: {detail}", answer.get("code"))
        raise CniError(f"{what} exited with {proc.returncode}: {(err or out).decode(errors='replace').strip()}")
    if command != "ADD":
        return None
    if not isinstance(answer, dict) or "cniVersion" not in answer:
        raise CniError(f"{what} returned no result: {out.decode(errors='replace').strip()[:200]!r}")
    return answer


def _env(node: Mapping, command: str, container_id: str, netns: str, cni_args: str, ifname: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update(CNI_COMMAND=command, CNI_CONTAINERID=container_id, CNI_NETNS=netns_path(netns),
               CNI_IFNAME=ifname, CNI_PATH=node["cni_bin_dir"], CNI_ARGS=cni_args)
    return env


def add(node: Mapping, container_id: str, netns: str, cni_args: str, ifname: str = IFNAME, cache_dir: Optional[str] = None) -> dict:
    """ADD through the whole list; the last plugin's result. On failure the list is
    deleted again and CniError raised."""
    conf = load_conflist(node["cni_conf_dir"])
    env = _env(node, "ADD", container_id, netns, cni_args, ifname)
    result = None
    try:
        for plugin in conf["plugins"]:
            result = _invoke(node, plugin, conf, "ADD", env, result)
    except CniError:
        try:
            delete(node, container_id, netns, cni_args, ifname, prev=result)
        except CniError as e:
            logger.warning("rolling back a failed ADD: %s", e)
        raise
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        with open(_cache_file(cache_dir, conf["name"], container_id, ifname), "w") as f:
            json.dump(result, f)
    return result


def cached_result(node: Mapping, container_id: str, ifname: str = IFNAME, cache_dir: Optional[str] = None) -> Optional[dict]:
    if not cache_dir:
        return None
    conf = load_conflist(node["cni_conf_dir"])
    try:
        with open(_cache_file(cache_dir, conf["name"], container_id, ifname)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def delete(node: Mapping, container_id: str, netns: str, cni_args: str, ifname: str = IFNAME,
           cache_dir: Optional[str] = None, prev: Optional[dict] = None) -> None:
    """DEL through the list in reverse, every plugin tried; the first failure raised."""
    conf = load_conflist(node["cni_conf_dir"])
    if prev is None:
        prev = cached_result(node, container_id, ifname, cache_dir)
    env = _env(node, "DEL", container_id, netns, cni_args, ifname)
    first: Optional[CniError] = None
    for plugin in reversed(conf["plugins"]):
        try:
            _invoke(node, plugin, conf, "DEL", env, prev)
        except CniError as e:
            logger.warning("%s", e)
            first = first or e
    if cache_dir:
        try:
            os.unlink(_cache_file(cache_dir, conf["name"], container_id, ifname))
        except FileNotFoundError:
            pass
    if first is not None:
        raise first


def check(node: Mapping, container_id: str, netns: str, cni_args: str, ifname: str = IFNAME, cache_dir: Optional[str] = None) -> None:
    """CHECK through the list in order with the cached ADD result; CniError when a
    plugin finds the sandbox not as it left it."""
    conf = load_conflist(node["cni_conf_dir"])
    prev = cached_result(node, container_id, ifname, cache_dir)
    if prev is None:
        raise CniError(f"CHECK {container_id}: no cached ADD result")
    env = _env(node, "CHECK", container_id, netns, cni_args, ifname)
    for plugin in conf["plugins"]:
        _invoke(node, plugin, conf, "CHECK", env, prev)
