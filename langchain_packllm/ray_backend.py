"""Members as Ray actors: a pack spread over processes, GPUs or machines (``backend="ray"``).

Each member lives in a Ray actor (:class:`MemberWorker`) that loads it where its resources are, holds the
KV caches of the calls in flight and runs their forwards. The driver keeps everything else: the members'
tokenizers (shipped from the actors, so no shared file system is needed), reference planning and token
maps, the weight solve, the mix, sampling and streaming. The seam is the member's model: on the driver a
member's ``model`` is a :class:`RemoteModel` whose forward is its actor's, so the engine
(:class:`~langchain_packllm.engine.FusionEngine`, the :class:`~langchain_packllm.scoring.Scorer`, every
alignment map and step source above it) runs unchanged, and its outputs equal the in-process engine's
token for token.

What crosses a process boundary, per member:

- per call, once: the prompt's ids ``(B, L)`` int64 (plus the attention mask and position ids when some
  row is padded), and back the prompt's logits ``(B, L, V)`` in the member's dtype (the weight solve
  reads every position's full distribution); in a pack of mixed vocabularies, also each member's own
  tokenization of the prompt and its logits, for the bits-per-byte choice of the reference;
- per decode step: the new ids ``(B, 1)`` (and one mask column and the positions when padded: 8 bytes
  per row each; the mask sent so far stays on the actor), and back the next-token logits ``(B, V)`` in
  the member's dtype. ``docs/PERFORMANCE.md`` has the figures.

KV caches are keyed by a per-call handle attached to the driver-side cache object the engine creates for
the call; when that object is collected (the call ended or its stream was abandoned) a finaliser frees the
actor's cache. An actor that dies or runs out of memory raises :class:`MemberActorError` naming the
member; Ray restarts the actor (``max_restarts``) and the next call runs on the restarted one.

Under ``alignment="prefix"`` a member of another tokenizer follows the text with its own tokens
(``bytealign.MemberTextState``): it asks its cache how many positions it holds and crops it back to the
common prefix when re-encoding the text changes its last tokens. A remote member's driver-side cache is a
:class:`RemoteCache` (made by :meth:`RemoteModel.new_cache`, the seam ``members.new_cache`` calls): it
counts the positions the actor's cache holds, and a crop becomes "crop to n", sent with the next forward
and applied on the actor before it runs (no cache crosses). Per step such a member sends the ``s``
tokens it forwards (their ids and positions, 16 bytes each: usually one token, a few when the re-encoding
changed them; a pending crop as one integer) and gets back their logits (``s x V`` in the member's
dtype). Per call every member
forwards its own tokenization of the prompt twice, as in-process (for the weight solve, then to fill its
cache), so its ``L_k x V_k`` logits come back twice.

Ray is imported only when this backend is used (``pip install 'langchain-packllm[ray]'``).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from langchain_packllm.engine import FusionEngine
from langchain_packllm.members import Member, cache_kwargs, load_member

logger = logging.getLogger(__name__)

RESOURCE_KEYS = frozenset(
    {"num_cpus", "num_gpus", "memory", "resources", "accelerator_type", "torch_threads"}
)
"""What ``member_resources`` entries may say: Ray's actor resources, and ``torch_threads`` (the actor's
``torch.set_num_threads``; by default Ray's, the actor's ``num_cpus`` or 1)."""

DEFAULT_MAX_RESTARTS = 3

INLINE_RETURN_BYTES = 8 << 20
"""Ray's ``max_direct_call_object_size`` for a local cluster started here: a step's logits (``B x V`` per
member: 0.6 MB per row at V = 152k in float32) come back inline with the task's reply instead of through
the object store, which costs 2-3 ms more per actor call here. On a cluster started with ``ray start``, set
``RAY_max_direct_call_object_size=8388608`` in the environment of ``ray start`` for the same effect."""
LOCAL_SYSTEM_CONFIG = {"max_direct_call_object_size": INLINE_RETURN_BYTES}


class MemberActorError(RuntimeError):
    """A member's Ray actor failed (died, ran out of memory, lost a call's state, or raised)."""

    def __init__(self, member: str, message: str):
        super().__init__(f"Member {member!r} (Ray actor): {message}")
        self.member = member


class _LostCache(RuntimeError):
    """Raised on the actor for a step whose KV cache it does not hold (the actor restarted mid-call)."""


def require_ray():
    """The ``ray`` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as err:  # pragma: no cover - the test extra installs ray
        raise ImportError(
            "backend='ray' needs Ray: pip install 'langchain-packllm[ray]' (ray==2.60.0)."
        ) from err
    return ray


# ---------------------------------------------------------------------------------------------- transport


def _to_wire(t: torch.Tensor | None) -> tuple[str, np.ndarray] | None:
    """A tensor as (dtype name, numpy array): numpy arrays travel through Ray's object store without
    pickling their data; bfloat16, which numpy lacks, travels as its int16 bits."""
    if t is None:
        return None
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if t.dtype == torch.bfloat16:
        return name, t.view(torch.int16).numpy()
    return name, t.numpy()


def _from_wire(wire: tuple[str, np.ndarray] | None) -> torch.Tensor | None:
    if wire is None:
        return None
    name, array = wire
    if not array.flags.writeable:  # a zero-copy view of the object store: torch wants writable memory
        array = array.copy()
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if name == "bfloat16" else t


# ---------------------------------------------------------------------------------------------- the actor


class MemberWorker:
    """One member in a Ray actor: loads it with :func:`~langchain_packllm.members.load_member` where the
    actor runs, holds the KV caches of calls in flight (keyed by the driver's handle), runs forwards.
    Ray runs an actor's methods one at a time, so each member runs one forward at a time, as in-process."""

    def __init__(self, model_id: str, load: dict[str, Any], torch_threads: int | None):
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        device = load.pop("device", None)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.member = load_member(model_id, device=device, **load)
        self.caches: dict[int, list] = {}  # key -> [DynamicCache, attention mask so far or None]

    def meta(self) -> dict[str, Any]:
        import ray

        m = self.member
        return {
            "name": m.name,
            "tokenizer": m.tokenizer,
            "config": m.model.config,
            "generation_config": m.model.generation_config,
            "dtype": str(m.model.dtype).removeprefix("torch."),
            "vocab_size": m.vocab_size,
            "extra": dict(m.extra),
            "device": str(m.device),
            "node": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
        }

    @torch.inference_mode()
    def forward(self, key, new, crop, input_ids, attention_mask, mask_tail, position_ids, kwargs):
        """The model's logits on member ids. ``key``: the call's cache (None: no cache); ``new``: the
        call's first forward (its cache is made here); ``crop``: keep only the first ``crop`` positions of
        that cache (and of its mask) before this forward (None: keep all); ``mask_tail``: columns appended
        to the mask this actor holds for ``key`` (instead of the whole ``attention_mask``)."""
        model, dev = self.member.model, self.member.device
        ids = _from_wire(input_ids).to(dev)
        mask = _from_wire(attention_mask)
        cache = None
        if key is not None:
            entry = self.caches.get(key)
            if entry is None:
                if not new:
                    raise _LostCache(
                        "this call's KV cache is gone: the actor restarted during the call; run it again."
                    )
                entry = self.caches[key] = [DynamicCache(config=model.config), None]
            cache = entry[0]
            if crop is not None:
                if cache.get_seq_length() > crop:
                    cache.crop(crop - cache.get_seq_length())  # a negative count: drop that many entries
                if entry[1] is not None:
                    entry[1] = entry[1][:, :crop]
            if mask_tail is not None:
                mask = torch.cat([entry[1], _from_wire(mask_tail)], dim=1)
            entry[1] = mask
            kwargs = {**kwargs, **cache_kwargs(model, cache)}
        positions = _from_wire(position_ids)
        out = model(
            input_ids=ids,
            attention_mask=None if mask is None else mask.to(dev),
            position_ids=None if positions is None else positions.to(dev),
            **kwargs,
        )
        return _to_wire(out.logits)

    def free(self, key: int) -> None:
        self.caches.pop(key, None)

    def cached_calls(self) -> int:
        """How many calls' KV caches the actor holds (the tests check that they are freed)."""
        return len(self.caches)

    def pid(self) -> int:
        return os.getpid()


# ---------------------------------------------------------------------------------------------- the driver


class _Output:
    __slots__ = ("logits",)

    def __init__(self, logits: torch.Tensor):
        self.logits = logits


class _Weight:
    """What ``Member.device`` / ``Member.vocab_size`` read of an embedding: a tensor of the right first
    dimension holding no data, on the driver's CPU."""

    def __init__(self, rows: int):
        self.weight = torch.empty((rows, 0))


class _CallHandle:
    """A call's KV cache on the actor, attached to the driver-side cache object the engine makes for the
    call; freed on the actor when that object is collected."""

    _keys = itertools.count(1)

    def __init__(self, remote: RemoteModel, cache: Any):
        self.key = next(self._keys)
        self.sent = False
        self.mask: torch.Tensor | None = None  # the mask the actor holds for this call
        self.length = 0  # positions the actor's cache holds once the forwards sent so far have run
        self.crop: int | None = None  # "keep the first n positions", sent with the next forward
        finalizer = weakref.finalize(cache, _free_remote, remote, self)
        finalizer.atexit = False

    def renew(self, remote: RemoteModel) -> None:
        """A fresh key for a first forward sent again (the first try may have left a cache behind)."""
        _free_remote(remote, self)
        self.key = next(self._keys)


def _free_remote(remote: RemoteModel, handle: _CallHandle) -> None:
    actor = remote.actor
    if actor is None:
        return
    try:
        actor.free.remote(handle.key)
    except Exception:  # noqa: BLE001 - Ray shut down or the actor gone: nothing left to free
        pass


class RemoteCache:
    """The driver's side of one call's KV cache on a member's actor (:meth:`RemoteModel.new_cache`): the
    cache itself lives on the actor; this object carries the call's :class:`_CallHandle` (made on its
    first forward) and answers what a member's ``DynamicCache`` is asked on the driver (by
    ``bytealign.MemberTextState``): how many positions it holds, and ``crop``, which takes effect on the
    actor with the next forward."""

    __slots__ = ("_packllm_ray", "__weakref__")

    def __init__(self):
        self._packllm_ray: _CallHandle | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        handle = self._packllm_ray
        return 0 if handle is None else handle.length

    def crop(self, max_length: int) -> None:
        """As ``DynamicCache.crop``: a negative count drops that many positions from the end; a count
        >= 0 keeps that many."""
        handle = self._packllm_ray
        if handle is None:
            return
        keep = handle.length + max_length if max_length < 0 else max_length
        if keep >= handle.length:
            return
        keep = max(keep, 0)
        handle.length, handle.crop = keep, keep
        if handle.mask is not None:
            handle.mask = handle.mask[:, :keep]


class RemoteModel:
    """The driver's stand-in for a member's model: what the engine reads (``config``, ``dtype``,
    ``generation_config``, the embeddings' shapes), and a forward that runs on the member's actor."""

    base_model_prefix = ""  # no linear-head shortcut: the actor returns logits
    restart_timeout_s = 600.0  # how long a call's first forward waits for a restarting actor

    def __init__(self, name: str, actor: Any, meta: dict[str, Any]):
        self.name = name
        self.actor = actor
        self.config = meta["config"]
        self.generation_config = meta["generation_config"]
        self.dtype = getattr(torch, meta["dtype"])
        self.name_or_path = meta["name"]
        self.meta = meta
        self._input = _Weight(len(meta["tokenizer"]))
        self._output = _Weight(meta["vocab_size"])

    def get_input_embeddings(self) -> _Weight:
        return self._input

    def get_output_embeddings(self) -> _Weight:
        return self._output

    def eval(self) -> RemoteModel:
        return self

    def new_cache(self) -> RemoteCache:
        """A call's KV cache (see ``members.new_cache``): a :class:`RemoteCache` on the driver, a
        ``DynamicCache`` on the actor from the call's first forward."""
        return RemoteCache()

    def __call__(self, *args, **kwargs) -> _Output:
        return self.forward(*args, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> _Output:
        ray = require_ray()
        if self.actor is None:
            raise MemberActorError(self.name, "the engine was closed; build a new one.")
        key, new, crop, tail, mask, handle = None, False, None, None, attention_mask, None
        if past_key_values is not None:
            handle = getattr(past_key_values, "_packllm_ray", None)
            if handle is None:
                handle = _CallHandle(self, past_key_values)
                past_key_values._packllm_ray = handle
            key, new = handle.key, not handle.sent
            sent = handle.mask
            if (
                mask is not None
                and sent is not None
                and mask.shape[1] > sent.shape[1]
                and torch.equal(mask[:, : sent.shape[1]], sent)
            ):
                tail, mask = mask[:, sent.shape[1] :], None
            handle.mask = attention_mask
            handle.sent = True
            crop, handle.crop = handle.crop, None
            handle.length += input_ids.shape[1]
        args = (_to_wire(input_ids), _to_wire(mask), _to_wire(tail), _to_wire(position_ids), kwargs)
        deadline = time.monotonic() + self.restart_timeout_s
        while True:
            try:
                return _Output(_from_wire(ray.get(self.actor.forward.remote(key, new, crop, *args))))
            except ray.exceptions.ActorUnavailableError as err:
                # The actor is restarting. A call's first forward (nothing of it lives on the actor yet)
                # waits for it; a call mid-decode lost its KV cache and fails.
                if (key is not None and not new) or time.monotonic() > deadline:
                    raise _actor_error(self.name, err) from err
                if handle is not None:
                    handle.renew(self)
                    key = handle.key
                time.sleep(0.1)
            except Exception as err:  # noqa: BLE001 - sorted out by _actor_error
                raise _actor_error(self.name, err) from err


def _actor_error(name: str, err: BaseException) -> BaseException:
    """A clear error for a failed actor call, naming the member."""
    import ray.exceptions as rex

    if isinstance(err, rex.OutOfMemoryError):
        return MemberActorError(name, f"killed by Ray's memory monitor (out of host memory): {err}")
    if isinstance(err, rex.RayActorError):
        return MemberActorError(
            name,
            f"its actor died or is unreachable ({type(err).__name__}); Ray restarts it (up to max_restarts "
            f"times) and the next call runs on the restarted actor. Cause: {str(err).splitlines()[0]}",
        )
    if isinstance(err, rex.RayTaskError):
        cause = err.cause
        if isinstance(cause, torch.OutOfMemoryError):
            return MemberActorError(name, f"out of device memory: {cause}")
        if isinstance(cause, _LostCache):
            return MemberActorError(name, str(cause))
        return MemberActorError(name, f"{type(cause).__name__}: {cause}")
    return err


class RayFusionEngine(FusionEngine):
    """A :class:`FusionEngine` whose members run in Ray actors (see the module docstring). ``close()`` ends
    the actors. Build one with :func:`load_ray_engine` (or ``PackLLM.from_model_ids(..., backend="ray")``)."""

    def __init__(self, members: Sequence[Member], alignment: str = "auto"):
        super().__init__(members, mix_device="cpu", alignment=alignment)
        K = len(self.members)
        if K > 1:  # one driver thread per member: the actors' forwards run concurrently
            self.scorer.use_device_groups([[k] for k in range(K)])

    @property
    def actors(self) -> list[Any]:
        return [m.model.actor for m in self.members]

    def close(self) -> None:
        """End the actors (and the driver's threads); later calls raise :class:`MemberActorError`."""
        super().close()
        ray = require_ray()
        killed = []
        for m in self.members:
            actor, m.model.actor = m.model.actor, None
            if actor is not None and ray.is_initialized():
                try:
                    ray.kill(actor, no_restart=True)
                    killed.append(actor)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        deadline = time.monotonic() + 10.0  # ray.kill returns at once: wait until the actors are gone
        for actor in killed:
            while time.monotonic() < deadline:
                try:
                    ray.get(actor.pid.remote(), timeout=1.0)
                except ray.exceptions.GetTimeoutError:
                    continue
                except Exception:  # noqa: BLE001 - RayActorError: it is gone
                    break
                time.sleep(0.05)


def check_member_resources(member_resources: Sequence[dict[str, Any]] | None, n: int) -> list[dict]:
    """``member_resources`` as one dict per member, or a ValueError saying what is wrong."""
    if member_resources is None:
        return [{} for _ in range(n)]
    if isinstance(member_resources, dict):
        raise TypeError("member_resources takes one dict per member (a list), not a single dict.")
    out = list(member_resources)
    if len(out) != n:
        raise ValueError(f"Got {len(out)} member_resources for {n} members; give one dict per member.")
    for i, spec in enumerate(out):
        if not isinstance(spec, dict):
            raise TypeError(f"member_resources[{i}] must be a dict, got {type(spec).__name__}.")
        unknown = sorted(set(spec) - RESOURCE_KEYS)
        if unknown:
            raise ValueError(
                f"member_resources[{i}] has unknown keys {unknown}; allowed: {sorted(RESOURCE_KEYS)}."
            )
        for key in ("num_cpus", "num_gpus", "memory", "torch_threads"):
            value = spec.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
            ):
                raise ValueError(f"member_resources[{i}][{key!r}] must be a number >= 0, got {value!r}.")
        extra = spec.get("resources")
        if extra is not None and (
            not isinstance(extra, dict) or not all(isinstance(v, (int, float)) for v in extra.values())
        ):
            raise ValueError(f"member_resources[{i}]['resources'] must map resource names to numbers.")
    return [dict(s) for s in out]


def _check_cluster(ray, specs: list[dict]) -> None:
    """Refuse, before anything loads, a pack the cluster cannot place (an actor would wait forever)."""
    total = ray.cluster_resources()
    need: dict[str, float] = {}
    for spec in specs:
        for key, name in (("num_cpus", "CPU"), ("num_gpus", "GPU"), ("memory", "memory")):
            if spec.get(key):
                need[name] = need.get(name, 0) + float(spec[key])
        for name, value in (spec.get("resources") or {}).items():
            need[name] = need.get(name, 0) + float(value)
    short = [f"{name}: the pack asks {v:g}, the cluster has {total.get(name, 0):g}" for name, v in need.items()
             if v > total.get(name, 0) + 1e-9]  # fmt: skip
    if short:
        raise ValueError(
            "The Ray cluster cannot place every member (" + "; ".join(short) + "). Lower member_resources "
            "or add nodes (ray start --address=HEAD:6379 on each)."
        )


def connect(ray_address: str | None = None, **init_kwargs: Any) -> None:
    """Join the Ray cluster at ``ray_address`` ("auto", "HOST:6379", "ray://HOST:10001"), or start a local
    one when ``ray_address`` is None and no cluster is running; reuses the connection already made in this
    process. A missing cluster raises ConnectionError naming the address."""
    ray = require_ray()
    if ray.is_initialized():
        return
    _check_reachable(ray_address)
    try:
        if ray_address is None and not os.environ.get("RAY_ADDRESS"):
            try:  # a new local cluster takes the system config; joining a running one refuses it
                ray.init(include_dashboard=False, log_to_driver=False, _system_config=LOCAL_SYSTEM_CONFIG,
                         **init_kwargs)  # fmt: skip
                return
            except ValueError as err:
                if "_system_config" not in str(err):
                    raise
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False, **init_kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConnectionError(
            f"Could not connect to a Ray cluster at {ray_address!r}: {err}. Start one with `ray start --head` "
            "(and `ray start --address=HEAD:6379` on the other machines), or pass ray_address=None to run "
            "a local one."
        ) from err


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """A ConnectionError now for a ``HOST:PORT`` (or ``ray://HOST:PORT``) nobody listens on: ``ray.init``
    would retry for minutes."""
    if not address or address == "auto" or address.startswith("local"):
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(
            f"No Ray cluster answers at {address!r} ({err}). Start one with `ray start --head` (and `ray start "
            "--address=HEAD:6379` on the other machines), or pass ray_address=None to run a local one."
        ) from err


def load_ray_engine(
    model_ids: Sequence[str],
    *,
    member_resources: Sequence[dict[str, Any]] | None = None,
    ray_address: str | None = None,
    device: str | None = None,
    torch_dtype: str | torch.dtype | None = None,
    model_kwargs: dict[str, Any] | None = None,
    tokenizer_kwargs: dict[str, Any] | None = None,
    names: Sequence[str] | None = None,
    alignment: str = "auto",
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    load_timeout_s: float | None = 1800.0,
) -> RayFusionEngine:
    """A :class:`RayFusionEngine`: each member loaded in its own Ray actor with ``member_resources[k]``
    (e.g. ``{"num_gpus": 1}``; see :data:`RESOURCE_KEYS`). ``device``: where actors put their member
    (default: ``"cuda"`` when the actor sees a GPU, else ``"cpu"``). Bad resources, a missing cluster, or a
    pack the cluster cannot place raise before any model loads."""
    if isinstance(model_ids, str):
        raise TypeError("model_ids must be a list of ids or paths, not a single string.")
    model_ids = [os.fspath(m) for m in model_ids]
    if not model_ids:
        raise ValueError("A pack needs at least one member; model_ids is empty.")
    if names is not None and len(names) != len(model_ids):
        raise ValueError(f"Got {len(names)} names for {len(model_ids)} model ids.")
    specs = check_member_resources(member_resources, len(model_ids))
    ray = require_ray()
    connect(ray_address)
    _check_cluster(ray, specs)
    worker = ray.remote(MemberWorker)
    if isinstance(torch_dtype, torch.dtype):
        torch_dtype = str(torch_dtype).removeprefix("torch.")
    actors = []
    for i, (mid, spec) in enumerate(zip(model_ids, specs)):
        spec = dict(spec)
        threads = spec.pop("torch_threads", None)
        load = {
            "name": None if names is None else names[i],
            "device": device if device is not None else ("cuda" if spec.get("num_gpus") else None),
            "torch_dtype": torch_dtype,
            "model_kwargs": model_kwargs,
            "tokenizer_kwargs": tokenizer_kwargs,
        }
        options = {k: v for k, v in spec.items() if v is not None}
        actors.append(
            worker.options(max_restarts=max_restarts, max_task_retries=0, **options).remote(
                mid, load, threads
            )
        )
    try:
        metas = _gather(ray, [a.meta.remote() for a in actors], model_ids, load_timeout_s)
    except BaseException:
        for a in actors:
            ray.kill(a, no_restart=True)
        raise
    members = []
    for actor, meta in zip(actors, metas):
        model = RemoteModel(meta["name"], actor, meta)
        extra = {**meta["extra"], "ray": {k: meta[k] for k in ("node", "pid", "device", "torch_threads")}}
        members.append(Member(meta["name"], model, meta["tokenizer"], extra))
    try:
        return RayFusionEngine(members, alignment=alignment)
    except BaseException:
        for a in actors:
            ray.kill(a, no_restart=True)
        raise


def _gather(ray, refs: list, model_ids: list[str], timeout: float | None) -> list[dict]:
    """Each actor's metadata, once its member loaded; a clear error naming the member that did not."""
    out = []
    for mid, ref in zip(model_ids, refs):
        try:
            out.append(ray.get(ref, timeout=timeout))
        except ray.exceptions.GetTimeoutError as err:
            raise TimeoutError(
                f"Member {mid!r} did not load within {timeout:g} s on its Ray actor (is the cluster short of "
                "the resources it asks?)."
            ) from err
        except ray.exceptions.RayTaskError as err:
            cause = err.cause
            raise MemberActorError(mid, f"failed to load: {type(cause).__name__}: {cause}") from err
        except ray.exceptions.RayActorError as err:
            raise MemberActorError(mid, f"its actor died while loading: {str(err).splitlines()[0]}") from err
    return out
