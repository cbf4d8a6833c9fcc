"""Put mcnp-cni into a node's CNI chain, and take it out again.

The node's CNI owns its configuration; mcnp only chains after it, the way Istio's
install-cni and Cilium's generic-veth chaining do: copy the plugin binary into the
host's CNI binary directory, then append ``{"type": "mcnp-cni"}`` to the end of the
``plugins`` of the configuration the container runtime uses — the first file of the
configuration directory in lexical order with the extension ``.conflist``, ``.conf`` or
``.json``, as containerd and CRI-O pick it. A lone ``.conf``/``.json`` (one plugin) is
converted into a ``.conflist`` holding that plugin then mcnp-cni; the mcnp entry
remembers the original name so that removal restores it.

Why Python and not a shell script: the DaemonSet's image holds the daemon's Python
anyway, editing JSON from sh needs a tool the image would add for this alone, and the
same code is tested offline against the conflist shapes real CNIs write.

Every write is atomic (temp file, fsync, rename), keeps the file's mode, and is made
only if the file did not change since it was read (a CNI installer rewriting it at the
same moment wins; the next pass of ``--watch`` adds mcnp again). A file that is not a
valid CNI configuration is never touched. ``install --watch`` keeps the entry in place
when the node's CNI rewrites its configuration (flannel and Calico do on restart) and
waits, saying so, on a node that has no configuration yet.

Removal (``uninstall``) takes the entry out, restores a converted ``.conf``, and leaves
the binary in place unless asked (``--remove-binary``): a runtime may still run it for
the DEL of a pod created while it was in the chain, and a missing binary would make
that DEL fail. ``uninstall --hold`` also leaves a hold file (HOLD_FILE, hidden, in the
configuration directory) that makes ``install --watch`` stand still, so that mcnp can be
taken off a node while its DaemonSet pod still runs; a one-shot ``install`` (an
operator's) lifts the hold.

Run as ``python -m control.node.cni_install install|uninstall ...`` (or through ``main``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from control.node.cni import DEFAULT_SOCKET, atomic_write

logger = logging.getLogger(__name__)

PLUGIN_TYPE = "mcnp-cni"
#: Where the DaemonSet mounts the host's directories (and where most runtimes keep them).
DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_BIN_DIR = "/opt/cni/bin"
#: The binary this package ships (built from csrc/mcnp_cni.c).
BUNDLED_PLUGIN = Path(__file__).with_name("mcnp-cni")
#: Key of the mcnp entry naming the single-plugin file it was converted from.
CONVERTED_FROM = "mcnpConvertedFrom"
CONF_EXTENSIONS = (".conf", ".conflist", ".json")
#: Seconds between passes of ``install --watch``.
WATCH_INTERVAL = 5.0
#: In the configuration directory: while it exists, ``install --watch`` does nothing.
HOLD_FILE = ".mcnp-cni-hold"
#: Largest configuration file read (CNI configurations are a few KiB).
MAX_CONF_BYTES = 1024 * 1024


class InstallError(Exception):
    """The node's configuration cannot be edited safely; nothing was written."""


@dataclass(frozen=True)
class Outcome:
    """What one pass did: ``changed`` is False when everything was already in place."""

    changed: bool
    message: str
    path: Optional[Path] = None


# --------------------------------------------------------------------------- the configuration file


def runtime_config(conf_dir: Path) -> Optional[Path]:
    """The file the runtime uses: the first of conf_dir in lexical order with a CNI
    extension (hidden files are not configurations; our temp files are hidden)."""
    try:
        names = sorted(n for n in os.listdir(conf_dir) if n.endswith(CONF_EXTENSIONS) and not n.startswith("."))
    except FileNotFoundError:
        return None
    for name in names:
        if (conf_dir / name).is_file():
            return conf_dir / name
    return None


def _read(path: Path) -> tuple[dict, os.stat_result]:
    st = os.stat(path)
    if st.st_size > MAX_CONF_BYTES:
        raise InstallError(f"{path}: larger than {MAX_CONF_BYTES} bytes, not a CNI configuration")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise InstallError(f"{path}: not valid JSON ({e}); left as it is") from None
    if not isinstance(data, dict) or not isinstance(data.get("cniVersion"), str):
        raise InstallError(f"{path}: not a CNI configuration (no cniVersion); left as it is")
    if path.suffix == ".conflist":
        plugins = data.get("plugins")
        if not isinstance(plugins, list) or not plugins or not all(isinstance(p, dict) and isinstance(p.get("type"), str)
                                                                   for p in plugins):
            raise InstallError(f"{path}: plugins must be a non-empty list of objects with a type; left as it is")
    elif not isinstance(data.get("type"), str):
        raise InstallError(f"{path}: a single-plugin configuration needs a type; left as it is")
    return data, st


def _write(path: Path, data: dict, original: Optional[tuple[Path, os.stat_result]], mode: int) -> None:
    """Write data to path unless the file read (original) changed in the meantime."""
    if original is not None:
        src, st = original
        try:
            now = os.stat(src)
        except FileNotFoundError:
            raise InstallError(f"{src}: removed while being edited; retry") from None
        if (now.st_ino, now.st_mtime_ns, now.st_size) != (st.st_ino, st.st_mtime_ns, st.st_size):
            raise InstallError(f"{src}: changed while being edited; retry")
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode(), mode)


def _entry(socket: str) -> dict:
    entry = {"type": PLUGIN_TYPE}
    if socket != DEFAULT_SOCKET:
        entry["socket"] = socket
    return entry


def add_to_chain(conf_dir: Path, socket: str = DEFAULT_SOCKET) -> Outcome:
    """Append mcnp-cni to the runtime's configuration (idempotent)."""
    path = runtime_config(conf_dir)
    if path is None:
        return Outcome(False, f"no CNI configuration in {conf_dir} yet: nothing to chain after")
    data, st = _read(path)
    mode = st.st_mode & 0o777
    if path.suffix == ".conflist":
        plugins = data["plugins"]
        ours = [p for p in plugins if p.get("type") == PLUGIN_TYPE]
        wanted = _entry(socket)
        if ours and all({k: v for k, v in p.items() if k != CONVERTED_FROM} == wanted for p in ours):
            return Outcome(False, f"{path}: mcnp-cni already in the chain", path)
        kept = [p for p in plugins if p.get("type") != PLUGIN_TYPE]
        converted = [p[CONVERTED_FROM] for p in ours if CONVERTED_FROM in p]
        data["plugins"] = kept + [dict(wanted, **({CONVERTED_FROM: converted[0]} if converted else {}))]
        _write(path, data, (path, st), mode)
        return Outcome(True, f"{path}: mcnp-cni appended to the chain ({len(kept)} plugin(s) before it)", path)
    # A single plugin: the same chain as a list, then mcnp-cni.
    plugin = {k: v for k, v in data.items() if k not in ("cniVersion", "name")}
    chain = {"cniVersion": data["cniVersion"], "name": data.get("name", path.stem),
             "plugins": [plugin, dict(_entry(socket), **{CONVERTED_FROM: path.name})]}
    target = path.with_suffix(".conflist")
    if target.exists():
        raise InstallError(f"{path}: cannot convert, {target.name} exists already; left as it is")
    _write(target, chain, (path, st), mode)
    os.unlink(path)
    return Outcome(True, f"{path}: converted to {target.name} with mcnp-cni at the end of the chain", target)


def remove_from_chain(conf_dir: Path) -> list[Outcome]:
    """Take mcnp-cni out of every configuration of conf_dir that has it."""
    out: list[Outcome] = []
    for name in sorted(os.listdir(conf_dir)) if conf_dir.is_dir() else []:
        path = conf_dir / name
        if not name.endswith(".conflist") or name.startswith(".") or not path.is_file():
            continue
        try:
            data, st = _read(path)
        except InstallError as e:
            logger.warning("%s", e)
            continue
        ours = [p for p in data["plugins"] if p.get("type") == PLUGIN_TYPE]
        if not ours:
            continue
        kept = [p for p in data["plugins"] if p.get("type") != PLUGIN_TYPE]
        original = next((p[CONVERTED_FROM] for p in ours if isinstance(p.get(CONVERTED_FROM), str)), None)
        if original and len(kept) == 1 and not os.path.exists(conf_dir / original) \
                and os.path.basename(original) == original:
            single = {"cniVersion": data["cniVersion"], "name": data["name"], **kept[0]}
            _write(conf_dir / original, single, (path, st), st.st_mode & 0o777)
            os.unlink(path)
            out.append(Outcome(True, f"{path}: mcnp-cni removed, {original} restored", conf_dir / original))
        elif kept:
            data["plugins"] = kept
            _write(path, data, (path, st), st.st_mode & 0o777)
            out.append(Outcome(True, f"{path}: mcnp-cni removed from the chain", path))
        else:
            out.append(Outcome(False, f"{path}: holds nothing but mcnp-cni; left for its owner", path))
    return out


# --------------------------------------------------------------------------- the binary


def install_binary(bin_dir: Path, source: Path = BUNDLED_PLUGIN) -> Outcome:
    """Copy the plugin into bin_dir (atomically: a runtime running the old binary is
    not disturbed); nothing is written when the same bytes are there already."""
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise InstallError(f"{source}: the mcnp-cni binary is missing (build with setup.py build_ext)") from None
    target = bin_dir / PLUGIN_TYPE
    try:
        if target.read_bytes() == data and os.access(target, os.X_OK):
            return Outcome(False, f"{target}: up to date", target)
    except FileNotFoundError:
        pass
    if not bin_dir.is_dir():
        raise InstallError(f"{bin_dir}: no such directory (the host's CNI binary directory must be mounted)")
    atomic_write(target, data, 0o755)
    return Outcome(True, f"{target}: installed", target)


# --------------------------------------------------------------------------- commands


def install(conf_dir: Path, bin_dir: Path, socket: str = DEFAULT_SOCKET, source: Path = BUNDLED_PLUGIN) -> list[Outcome]:
    """Binary first, then the chain: the runtime never finds mcnp-cni in a chain
    without its binary."""
    return [install_binary(bin_dir, source), add_to_chain(conf_dir, socket)]


def watch(conf_dir: Path, bin_dir: Path, socket: str, source: Path, interval: float,
          passes: Optional[int] = None) -> None:
    """Install, then keep the chain entry in place; logs only what changes."""
    last = None
    n = 0
    while passes is None or n < passes:
        n += 1
        try:
            if (conf_dir / HOLD_FILE).exists():
                messages = [f"held by {conf_dir / HOLD_FILE}: mcnp-cni is kept out of the chain"]
            else:
                messages = [o.message for o in install(conf_dir, bin_dir, socket, source) if o.changed or o.path is None]
        except (InstallError, OSError) as e:
            messages = [f"not installed: {e}"]
        for m in messages:
            if m != last:
                logger.info("%s", m)
            last = m
        if passes is None or n < passes:
            time.sleep(interval)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cni_install", description="Chain mcnp-cni after the node's CNI, or take it out.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("install", "uninstall"):
        s = sub.add_parser(name)
        s.add_argument("--conf-dir", type=Path, default=Path(DEFAULT_CONF_DIR), help="the host's CNI configuration directory")
        s.add_argument("--bin-dir", type=Path, default=Path(DEFAULT_BIN_DIR), help="the host's CNI binary directory")
    inst = sub.choices["install"]
    inst.add_argument("--socket", default=DEFAULT_SOCKET, help="the daemon's CNI socket, as the plugin sees it on the host")
    inst.add_argument("--plugin", type=Path, default=BUNDLED_PLUGIN, help="the mcnp-cni binary to copy")
    inst.add_argument("--watch", action="store_true", help="keep mcnp-cni in the chain; wait for a configuration")
    inst.add_argument("--interval", type=float, default=WATCH_INTERVAL, help="seconds between passes of --watch")
    sub.choices["uninstall"].add_argument("--remove-binary", action="store_true",
                                          help="also delete mcnp-cni from the binary directory")
    sub.choices["uninstall"].add_argument("--hold", action="store_true",
                                          help="keep install --watch from putting mcnp-cni back")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Exit 0 when done (or nothing to do), 1 when a configuration could not be edited."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not os.path.isabs(getattr(args, "socket", "/")):
        logger.error("--socket must be an absolute path")
        return 2
    try:
        if args.command == "install" and args.watch:
            watch(args.conf_dir, args.bin_dir, args.socket, args.plugin, args.interval)
        elif args.command == "install":
            if (args.conf_dir / HOLD_FILE).exists():
                (args.conf_dir / HOLD_FILE).unlink()
                logger.info("%s: hold lifted", args.conf_dir / HOLD_FILE)
            for o in install(args.conf_dir, args.bin_dir, args.socket, args.plugin):
                logger.info("%s", o.message)
        else:
            if args.hold:  # first, so the watcher cannot put the entry back in between
                atomic_write(args.conf_dir / HOLD_FILE, b"mcnp-cni is kept out of this node's CNI chain\n", 0o644)
            outcomes = remove_from_chain(args.conf_dir)
            for o in outcomes or [Outcome(False, f"mcnp-cni is in no configuration of {args.conf_dir}")]:
                logger.info("%s", o.message)
            if args.remove_binary:
                (args.bin_dir / PLUGIN_TYPE).unlink(missing_ok=True)
                logger.info("%s: removed", args.bin_dir / PLUGIN_TYPE)
    except (InstallError, OSError) as e:
        logger.error("mcnp-cni %s: %s", args.command, e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
