"""Hook registry: YAML names -> Hook classes, with parameter validation."""
from __future__ import annotations

from pydantic import ValidationError

from distreg.hooks.base import Hook

_REGISTRY: dict[str, type[Hook]] = {}


def register(cls: type[Hook]) -> type[Hook]:
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"hook name {cls.name!r} missing or registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    # Importing a hook module registers its hooks.
    from distreg.hooks import fault, param_norm  # noqa: F401
    from distreg.hooks import sparsity  # noqa: F401
    from distreg.hooks import reweighting, self_distill  # noqa: F401
    from distreg.hooks import regularizers  # noqa: F401
    from distreg.hooks import moe  # noqa: F401
    from distreg.hooks import sara, dsnot, layer_adaptive  # noqa: F401
    from distreg.hooks import quant_noise, self_distill_gt  # noqa: F401
    from distreg.hooks import fire_together  # noqa: F401
    from distreg.hooks import hpm  # noqa: F401
    from distreg.hooks import adv_style  # noqa: F401


def hook_class(name: str) -> type[Hook]:
    _load_builtin()
    return _REGISTRY[name]


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def validate_hook_specs(specs, source: str = "<config>") -> None:
    """Raise ConfigError naming the hook entry for unknown names, bad params or conflicts."""
    build_hooks(specs, source)


def build_hooks(specs, source: str = "<config>") -> list[Hook]:
    from distreg.config import ConfigError

    _load_builtin()
    hooks: list[Hook] = []
    for i, spec in enumerate(specs):
        cls = _REGISTRY.get(spec.name)
        if cls is None:
            raise ConfigError(f"{source}: hooks.{i}.name: unknown hook {spec.name!r}; available: {', '.join(available())}")
        params = dict(spec.model_extra or {})
        try:
            hooks.append(cls(cls.Params.model_validate(params)))
        except ValidationError as e:
            msgs = "; ".join(
                f"hooks.{i}.{'.'.join(map(str, err['loc']))}: "
                + ("unknown parameter" if err["type"] == "extra_forbidden" else err["msg"])
                for err in e.errors()
            )
            raise ConfigError(f"{source}: hook {spec.name!r}: {msgs}") from None
    replacing = [h.name for h in hooks if h.replaces_loss]
    if len(replacing) > 1:
        raise ConfigError(f"{source}: hooks {' and '.join(repr(n) for n in replacing)} both replace the loss; use one")
    return hooks
