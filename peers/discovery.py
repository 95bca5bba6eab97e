"""Finding peers on the LAN with mDNS (zeroconf's asyncio API).

Each daemon advertises ``<node id>-<instance>._meshd._tcp.local.`` with a small TXT record and
browses for the others. TXT carries only what is needed to decide whether to dial at all (mesh,
model fingerprint, protocol) plus a summary for tooling; the cost curve and anything trusted comes
through the authenticated handshake instead, since anyone on the LAN can write TXT records.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable

from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf, get_all_addresses
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from peers.hello import Hello, incompatibility

log = logging.getLogger(__name__)

SERVICE_TYPE = "_meshd._tcp.local."
RESOLVE_TIMEOUT_MS = 3000


def txt_record(hello: Hello) -> dict[str, str]:
    return {
        "pv": str(hello.proto),
        "mesh": hello.mesh,
        "fp": hello.fingerprint,
        "id": hello.node_id,
        "inst": hello.instance,
        "mem": str(hello.memory_budget),
        "cs": f"{hello.compute_score:g}",
        "port": str(hello.api_port),
    }


class Discovery:
    def __init__(
        self,
        local: Hello,
        *,
        interface: str | None,
        on_found: Callable[[str, str, int], None],
        on_removed: Callable[[str], None],
    ) -> None:
        self.local, self.interface = local, interface
        self.on_found, self.on_removed = on_found, on_removed
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._names: dict[str, str] = {}  # service name -> node id, to report removals
        self._ignored: set[tuple[str, str]] = set()  # (service name, reason) already logged
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self.interface:
            version = IPVersion.V6Only if ipaddress.ip_address(self.interface).version == 6 else IPVersion.V4Only
            self._zc = AsyncZeroconf(interfaces=[self.interface], ip_version=version)
            addresses = [self.interface]
        else:
            self._zc = AsyncZeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
            addresses = [a for a in get_all_addresses() if not a.startswith("127.")] or ["127.0.0.1"]
        name = f"{self.local.node_id}-{self.local.instance}"
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{name}.{SERVICE_TYPE}",
            port=self.local.api_port,
            properties=txt_record(self.local),
            parsed_addresses=addresses,
            server=f"meshd-{name}.local.",
        )
        await self._zc.async_register_service(info)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        log.info("mDNS: advertising %s on %s", name, ", ".join(addresses))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._browser:
            await self._browser.async_cancel()
        if self._zc:
            await self._zc.async_unregister_all_services()
            await self._zc.async_close()

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            node_id = self._names.pop(name, None)
            if node_id:
                self.on_removed(node_id)
            return
        task = asyncio.create_task(self._resolve(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("mDNS: %s did not resolve", name)
            return
        txt = {k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in info.properties.items()}
        addresses = info.parsed_addresses(IPVersion.V4Only) or info.parsed_addresses()
        if txt.get("inst") == self.local.instance:
            return  # our own advertisement
        reason = self._problem(txt, addresses, info.port)
        if reason:
            if (name, reason) not in self._ignored:
                self._ignored.add((name, reason))
                log.info("mDNS: ignoring %s: %s", name, reason)
            return
        self._names[name] = txt["id"]
        self.on_found(txt["id"], addresses[0], int(info.port or 0))

    def _problem(self, txt: dict[str, str], addresses: list[str], port: int | None) -> str | None:
        if not txt.get("pv", "").isdigit() or not txt.get("id") or not addresses or not port:
            return f"incomplete advertisement (TXT {sorted(txt)}, addresses {addresses}, port {port})"
        why = incompatibility(self.local, txt.get("mesh", ""), txt.get("fp", ""), int(txt["pv"]))
        return f"it has another {why}" if why else None
