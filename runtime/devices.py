"""`edgesd devices`: the backends, providers and devices this machine can use, and what would add others."""

from __future__ import annotations


def describe_devices() -> dict:
    """{"onnxruntime": {...}, "openvino": {...}}: each backend's version (None: not installed) and what it runs on."""
    return {"onnxruntime": _onnxruntime(), "openvino": _openvino()}


def _onnxruntime() -> dict:
    try:
        from .backends.onnxruntime_backend import REGISTRY, ort
    except ImportError:
        return {"version": None, "install": "pip install onnxruntime"}
    providers = []
    for status in REGISTRY.statuses():
        providers.append({"name": status.provider.name, "ep_name": status.provider.ep_name, "usable": status.usable,
                          "how": status.how, "reason": status.reason,
                          "devices": [{"kind": d.kind, "vendor": d.vendor, "name": d.name} for d in status.devices],
                          "install": None if status.usable else status.fix})
    return {"version": ort.__version__, "providers": providers}


def _openvino() -> dict:
    try:
        import openvino as ov
    except ImportError:
        return {"version": None, "install": "pip install -c constraints.txt 'edgesd[openvino]'"}
    core = ov.Core()
    devices = []
    for name in core.available_devices:
        try:
            full = str(core.get_property(name, "FULL_DEVICE_NAME"))
        except Exception:  # a device plugin that cannot say
            full = ""
        devices.append({"name": name, "full_name": full})
    return {"version": ov.__version__ if hasattr(ov, "__version__") else ov.get_version(), "devices": devices}


def devices_text(summary: dict) -> list[str]:
    """The table `edgesd devices` prints."""
    lines = []
    ort = summary["onnxruntime"]
    if ort["version"] is None:
        lines.append(f"onnxruntime  not installed: {ort['install']}")
    else:
        lines.append(f"onnxruntime {ort['version']} (--backend onnxruntime --provider NAME)")
        for p in ort["providers"]:
            if p["usable"]:
                where = ", ".join(f"{d['kind']} {d['name']}".strip() for d in p["devices"]) or "its default device"
                lines.append(f"  {p['name']:<13}{p['how']:<10}{where}")
            else:
                lines.append(f"  {p['name']:<13}{'-':<10}{p['reason']}: {p['install']}")
    ov = summary["openvino"]
    if ov["version"] is None:
        lines.append(f"openvino     not installed: {ov['install']}")
    else:
        lines.append(f"openvino {ov['version']} (--backend openvino --device NAME)")
        for d in ov["devices"]:
            lines.append(f"  {d['name']:<13}{d['full_name']}")
    return lines
