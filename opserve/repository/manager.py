"""The lifecycle of the models in the repository: load, serve, restart, unload.

Placement (the rules live in `placement`, applied in `_new_worker`): every instance of a model
version (`instance_group.count`) is a worker process of its own, never shared with another
model, so a model's op libraries load and unload with it, never meet another model's libraries,
and a crash takes down only that instance, which is then replaced. With `--shared-workers`, the
instances of models that bring no op libraries and no environment of their own are slots of one
shared worker per framework backend (`workers/shared`); a crash of that process ends each of its
instances, and each is replaced as above.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from opserve.classification import output_labels
from opserve.config import (
    ModelSignature,
    autocomplete,
    changed_fields,
    config_from_model_json,
    config_to_json,
    model_config_for,
)
from opserve.config.autocomplete import DEFAULT_MAX_BATCH_SIZE
from opserve.config.normalize import (
    normalize_instance_groups,
    normalize_model_config,
    visible_gpus,
)
from opserve.config.support import check_fields
from opserve.config.validate import (
    check_against_signature,
    check_before_load,
    validate_config,
    validate_io,
)
from opserve.ensemble import EnsembleGraph, build_graph, check_steps, is_ensemble
from opserve.ensemble_scheduler import EnsembleScheduler, StepRunner
from opserve.errors import (
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OpserveError,
    UnavailableError,
)
from opserve.ops import (
    BACKEND_FRAMEWORKS,
    PRELOAD_HANDOFF,
    library_framework,
    preloaded_libraries,
    resolve_model_libraries,
)
from opserve.ops.build import build_library
from opserve.ops.inspect import collisions, framework_mismatch, inspect_library_async
from opserve.ops.needs import candidate_libraries, missing_op_in, unlisted_library_hint
from opserve.ops.resolve import SOURCES_PARAMETER, model_op_sources
from opserve.proto import ModelConfig
from opserve.remote.mirror import RepositoryMirror
from opserve.repository.confinement import confine_model_files
from opserve.repository.layout import (
    find_models,
    no_versions_reason,
    parse_version,
    select_versions,
    version_folders,
)
from opserve.repository.locks import NamedLocks
from opserve.repository.placement import Placement, place
from opserve.repository.supervision import execution_timeout, restart_delay
from opserve.response_cache import ResponseCache
from opserve.scheduler import Scheduler
from opserve.schema import ModelSchema
from opserve.sequence_config import SequenceSettings
from opserve.sequences import scheduler_for
from opserve.stats import VersionStats
from opserve.warmup import WarmupSample, warmup_samples
from opserve.workers.environments import environment_launcher, execution_environment
from opserve.workers.launcher import Launcher
from opserve.workers.messages import ModelLoaded
from opserve.workers.process import DEFAULT_RING_CAPACITY, Instance, WorkerHost, WorkerProcess
from opserve.workers.shared import SharedInstance, SharedWorkers

log = logging.getLogger(__name__)


class ModelState(str, Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADING = "UNLOADING"


@dataclass
class ModelVersion:
    model: str
    version: int
    directory: Path
    state: ModelState = ModelState.LOADING
    reason: str = ""
    workers: list[Instance] = field(default_factory=list)  # one per instance
    # set once the model's config is complete (an ensemble's: once its graph is checked)
    scheduler: Scheduler | EnsembleScheduler | None = None
    stats: VersionStats = field(default_factory=VersionStats)
    op_libraries: list[str] = field(default_factory=list)
    libraries: list[Path] = field(default_factory=list)  # the model's own, resolved
    stopped: bool = False  # its workers were stopped (failed, unloaded, replaced): no restarts

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY

    @property
    def label(self) -> str:
        return f"model '{self.model}' version {self.version}"


@dataclass
class Model:
    name: str
    directory: Path
    config: ModelConfig
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    reason: str = ""  # why the model as a whole is unavailable (config errors, no versions)
    completed: list[str] = field(default_factory=list)  # what auto-complete filled in
    schema: ModelSchema | None = None  # set once the config is complete
    unloaded: bool = False  # unloaded on request: out of service, and not held against readiness
    warmup: list[WarmupSample] = field(default_factory=list)  # model_warmup, ready to run
    labels: dict[str, list[bytes]] = field(default_factory=dict)  # output -> label_filename's
    execution_timeout_s: float = 0.0  # how long one `execute` may run (0: no limit)
    placement: Placement = Placement(None, "")  # a shared worker, or processes of its own

    def latest_ready(self) -> ModelVersion | None:
        """The highest ready version (every request without a version asks: no sorting)."""
        latest = None
        for entry in self.versions.values():
            if entry.state is ModelState.READY and (
                latest is None or entry.version > latest.version
            ):
                latest = entry
        return latest

    def ready_versions(self) -> list[ModelVersion]:
        return sorted((v for v in self.versions.values() if v.ready), key=lambda v: -v.version)

    @property
    def state(self) -> ModelState:
        if any(v.ready for v in self.versions.values()):
            return ModelState.READY
        if any(v.state is ModelState.LOADING for v in self.versions.values()):
            return ModelState.LOADING
        return ModelState.UNAVAILABLE


class ModelManager:
    """Owns every model of the repositories and the worker processes that host them."""

    def __init__(
        self,
        repositories: list[Path],
        server_op_libraries: list[Path] | None = None,
        ring_capacity: int = DEFAULT_RING_CAPACITY,
        op_library_roots: list[Path] | None = None,
        load_timeout_s: float = 600.0,
        auto_complete: bool = True,
        config_name: str = "",
        load_threads: int = 4,
        load_retries: int = 0,
        default_max_batch_size: dict[str, int] | None = None,
        max_instances: tuple[int, int] = (64, 512),
        execution_timeout_s: float = 0.0,
        remotes: Iterable[RepositoryMirror] = (),
        shared_workers: bool = False,
    ) -> None:
        self.repositories = [p.resolve() for p in repositories]
        # repositories in object storage: their mirrors are folders of `repositories`
        self.remotes = list(remotes)
        # framework -> libraries; None holds preloaded libraries of no framework (every worker gets those)
        self.server_op_libraries = _by_framework(p.resolve() for p in server_op_libraries or [])
        self.preloaded = _by_framework(preloaded_libraries())
        self.ring_capacity = ring_capacity
        self.op_library_roots = [p.resolve() for p in op_library_roots or []]
        self.load_timeout_s = load_timeout_s
        self.auto_complete = auto_complete  # --disable-auto-complete-config
        self.config_name = config_name  # --model-config-name
        self.load_retries = load_retries  # --model-load-retry-count
        self.execution_timeout_s = execution_timeout_s  # --execution-timeout-secs
        self._loading = asyncio.Semaphore(load_threads)  # --model-load-thread-count
        # --backend-config [backend,]default-max-batch-size=N ("" for every backend)
        self.default_max_batch_size = default_max_batch_size or {}
        # --max-instances-per-model, --max-instances-total: worker processes
        self.max_instances_per_model, self.max_instances_total = max_instances
        self.control_mode = "none"
        self.models: dict[str, Model] = {}
        self._locks = NamedLocks()  # one per model name while a load or unload holds it
        self._builds: dict[str, asyncio.Task[Model]] = {}  # loads under way (unload cancels)
        self._cancelled_builds: set[asyncio.Task[Model]] = set()  # by an unload
        self._tasks: set[asyncio.Task[None]] = set()
        self._fingerprints: dict[str, tuple[tuple[str, int, int], ...]] = {}
        self.host: WorkerHost | None = None  # what models may call (BLS, logging, metrics)
        self.response_cache: ResponseCache | None = None  # --cache-config local,size=BYTES
        self.step_runner: StepRunner | None = None  # what runs an ensemble's steps (the dataplane)
        self.gpus = visible_gpus()
        self.sharing = shared_workers  # --shared-workers
        self.shared = SharedWorkers(self._shared_process)
        # called after a load or an unload (the server settles its heap: collector.Settler)
        self.on_change: Callable[[], None] | None = None

    # queries -----------------------------------------------------------------------------------
    def model(self, name: str) -> Model:
        model = self.models.get(name)
        if model is None:
            raise NotFoundError(f"Request for unknown model: '{name}' is not found")
        return model

    def version(self, name: str, version: str = "") -> tuple[Model, ModelVersion]:
        """The model and the version a request addresses ("" = the latest ready one)."""
        number = parse_version(version)
        model = self.model(name)
        if number is not None:
            if number not in model.versions:
                raise NotFoundError(
                    f"Request for unknown model: '{name}' version {version} is not found"
                )
            entry = model.versions[number]
            if not entry.ready:
                raise UnavailableError(
                    f"{entry.label} is not ready: {entry.reason or entry.state.value}"
                )
            return model, entry
        latest = model.latest_ready()
        if latest is None:
            raise UnavailableError(f"model '{name}' has no ready versions: {self.reason(model)}")
        return model, latest

    def reason(self, model: Model) -> str:
        if model.reason:
            return model.reason
        reasons = [f"version {v.version}: {v.reason}" for v in model.versions.values() if v.reason]
        return "; ".join(reasons) or model.state.value

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: every model of the repositories, loaded or not."""
        entries: list[dict[str, str]] = []
        names = sorted(set(find_models(self.repositories)) | set(self.models))
        for name in names:
            model = self.models.get(name)
            if model is None:
                if not ready_only:
                    entries.append({"name": name})
                continue
            if not model.versions:
                if not ready_only:
                    entries.append(
                        {
                            "name": name,
                            "state": ModelState.UNAVAILABLE.value,
                            "reason": model.reason,
                        }
                    )
                continue
            for entry in sorted(model.versions.values(), key=lambda v: v.version):
                if ready_only and not entry.ready:
                    continue
                item = {"name": name, "version": str(entry.version), "state": entry.state.value}
                item["reason"] = entry.reason
                entries.append(item)
        return entries

    # loading -----------------------------------------------------------------------------------
    async def startup(
        self, control_mode: str = "none", load_models: list[str] | None = None
    ) -> None:
        """Modes none and poll load every model; explicit loads those named (`*` for all)."""
        self.control_mode = control_mode
        folders = find_models(self.repositories)
        wanted = (
            list(folders)
            if control_mode != "explicit" or "*" in (load_models or [])
            else load_models or []
        )
        unknown = [n for n in wanted if n not in folders]
        for name in unknown:
            log.error("--load-model '%s': no such model in the repositories", name)
        results = await self._load_in_order([n for n in wanted if n in folders], folders)
        for result in results:  # failures are logged and kept in the models' states
            if isinstance(result, BaseException) and not isinstance(result, OpserveError):
                raise result

    def failed_models(self) -> dict[str, str]:
        """The models asked for that failed to load, with why (for --exit-on-error); those
        still loading are not counted."""
        return {
            name: self.reason(model)
            for name, model in self.models.items()
            if model.state is ModelState.UNAVAILABLE and not model.unloaded
        }

    def loading_models(self) -> list[str]:
        return [name for name, model in self.models.items() if model.state is ModelState.LOADING]

    async def _load_in_order(self, names: list[str], folders: dict[str, Path]) -> list[object]:
        """Load models, each ensemble after the models its steps use (as Triton orders its
        dependency graph); the models without dependencies at once."""
        steps = {name: ensemble_steps(name, folders[name]) for name in names}
        results: list[object] = []
        waiting = list(names)
        while waiting:
            wave = [n for n in waiting if not any(s in waiting for s in steps[n] or ())]
            if not wave:  # a cycle between ensembles: each fails, naming what it lacks
                wave = list(waiting)
            for name in wave:
                waiting.remove(name)
            results += await asyncio.gather(
                *(self.load(name, _folders=folders) for name in wave), return_exceptions=True
            )
        return results

    # repositories in object storage -----------------------------------------------------------
    async def refresh(self, model: str | None = None) -> None:
        """Bring the local mirrors of remote repositories up to date (only `model`'s folder
        when named), off the event loop; the one place where they are synced after start-up.
        Raises `RemoteRepositoryError` naming the URL."""
        for mirror in self.remotes:
            await asyncio.to_thread(mirror.sync, model)

    # polling -----------------------------------------------------------------------------------
    def start_polling(self, interval_s: float) -> None:
        """Mode poll: watch the repositories and follow what changes, model by model."""
        self._background(self._poll_forever(interval_s))

    async def _poll_forever(self, interval_s: float) -> None:
        """A poll every `interval_s` from the start of the last one: the time a poll spends
        loading, and stopping the workers a reload replaced, is not added to the wait (a change
        is READY within the interval plus its load time, Triton's test windows)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            await asyncio.sleep(max(0.0, started + interval_s - loop.time()))
            started = loop.time()
            try:
                await self.poll_once()
            except Exception:  # a bad scan must not end polling
                log.exception("polling the model repositories failed")

    async def poll_once(self) -> None:
        """Load added models, reload changed ones (a hot swap), unload removed ones."""
        try:
            await self.refresh()
            folders = find_models(self.repositories)
        except OpserveError as exc:
            log.error("cannot poll the model repositories: %s", exc.message)
            return
        changed = [
            name
            for name, folder in folders.items()
            if name not in self.models or fingerprint(folder) != self._fingerprints.get(name)
        ]
        removed = [name for name in self.models if name not in folders]
        for name in changed:
            log.info("poll: model '%s' %s", name, "changed" if name in self.models else "appeared")
        for name in removed:
            log.info("poll: model '%s' was removed", name)
        await asyncio.gather(
            self._load_in_order(changed, folders),
            *(self._remove(name) for name in removed),
            return_exceptions=True,
        )

    async def _remove(self, name: str) -> None:
        await self.unload(name)
        async with self._locks.hold(name):
            self.models.pop(name, None)
            self._fingerprints.pop(name, None)

    async def load(
        self,
        name: str,
        config: ModelConfig | None = None,
        _chain: tuple[str, ...] = (),
        _folders: dict[str, Path] | None = None,
    ) -> Model:
        """Load a model, or load it again (new files, new libraries): the new versions start
        while the old ones keep serving; then the old workers finish their requests and end.
        If the new load fails, the old model stays in service. In explicit mode, loading an
        ensemble first loads the step models that are not loaded, as Triton does. `_folders`:
        the repositories' models as a scan just found them (start-up and polls scan once, not
        once per model: a scan of a thousand models costs tens of milliseconds)."""
        if self.control_mode == "explicit":
            await self._load_steps(name, config, (*_chain, name), _folders)
        try:
            return await self._load(name, config, _folders)
        finally:
            self._refresh_dependents(name)
            self._changed()

    async def _load(
        self, name: str, config: ModelConfig | None, folders: dict[str, Path] | None = None
    ) -> Model:
        async with self._locks.hold(name):
            try:
                if self.control_mode == "explicit":  # poll and start-up have just synced
                    await self.refresh(name)
                folder = (folders or find_models(self.repositories)).get(name)
            except OpserveError as exc:
                raise InternalError(
                    f"failed to load '{name}', failed to poll from model repository: {exc.message}"
                ) from None
            if folder is None:  # Triton's words and code
                raise InternalError(
                    f"failed to load '{name}', failed to poll from model repository"
                )
            # taken before reading: a change made while loading shows at the next poll
            self._fingerprints[name] = fingerprint(folder)
            previous = self.models.get(name)
            # a model that is not serving shows as LOADING while it loads
            publish = (
                previous is None or previous.unloaded or previous.state is not ModelState.READY
            )
            build = asyncio.ensure_future(self._build_with_retries(name, folder, config, publish))
            self._builds[name] = build
            try:
                model = await build
            except asyncio.CancelledError:
                if build not in self._cancelled_builds:
                    raise
                raise InvalidArgumentError(
                    f"load failed for model '{name}': it was unloaded while it loaded"
                ) from None
            finally:
                self._cancelled_builds.discard(build)
                if self._builds.get(name) is build:
                    del self._builds[name]
            if (
                model.state is not ModelState.READY
                and previous is not None
                and previous.state is ModelState.READY
            ):
                # a reload that fails loses nothing: the loaded model keeps serving
                reason = self.reason(model)  # before retiring it overwrites a model's reason
                await self._retire(model, "load failed")
                raise InvalidArgumentError(
                    f"load failed for model '{name}': {reason}; "
                    "the model that was loaded keeps serving"
                )
            self.models[name] = model
            if previous is not None:
                await self._retire(previous, "replaced by a new load")
            if model.state is not ModelState.READY:
                raise InvalidArgumentError(f"load failed for model '{name}': {self.reason(model)}")
            return model

    async def _build_with_retries(
        self, name: str, folder: Path, config: ModelConfig | None, publish: bool
    ) -> Model:
        async with self._loading:
            model = await self._build(name, folder, config, publish)
            for attempt in range(self.load_retries):
                if model.state is ModelState.READY:
                    break
                log.info(
                    "model '%s': retrying its load (%d of %d)", name, attempt + 1, self.load_retries
                )
                model = await self._build(name, folder, config, publish)
            return model

    async def _load_steps(
        self,
        name: str,
        config: ModelConfig | None,
        chain: tuple[str, ...],
        folders: dict[str, Path] | None = None,
    ) -> None:
        folders = folders or find_models(self.repositories)
        if name not in folders:
            return
        steps = ensemble_steps(name, folders[name], config) or []
        for step in steps:
            loaded = self.models.get(step)
            if step in chain or step not in folders:
                continue
            if loaded is not None and not loaded.unloaded and loaded.state is ModelState.READY:
                continue
            try:
                await self.load(step, _chain=chain, _folders=folders)
            except OpserveError as exc:  # the ensemble's load says why it cannot serve
                log.error("model '%s', a step of ensemble '%s': %s", step, name, exc.message)

    async def unload(self, name: str) -> None:
        """Unload a model: its workers, and with them its op libraries, are gone afterwards. A
        load under way (a model stuck in LOADING) is cancelled and its workers are killed."""
        build = self._builds.get(name)
        if build is not None and not build.done():
            log.info("model '%s': unloading it cancels its load", name)
            self._cancelled_builds.add(build)
            build.cancel()
        async with self._locks.hold(name):
            model = self.models.get(name)
            if model is None:
                if name not in find_models(self.repositories):
                    raise NotFoundError(f"failed to unload '{name}', no such model")
                return
            await self._retire(model, "unloaded")
            model.unloaded = True
            log.info("model '%s' is unloaded", name)
        self._refresh_dependents(name)
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _refresh_dependents(self, name: str, seen: frozenset[str] = frozenset()) -> None:
        """After a model loads or unloads, every loaded ensemble that uses it is checked again,
        as Triton re-evaluates an ensemble whose dependencies changed: READY, or UNAVAILABLE
        naming the step model it lacks."""
        seen = seen | {name}
        for model in list(self.models.values()):
            if model.name in seen or model.unloaded or model.reason or not model.versions:
                continue
            if not is_ensemble(model.config):
                continue
            if name not in {s.model_name for s in model.config.ensemble_scheduling.step}:
                continue
            if any(e.state is ModelState.UNLOADING for e in model.versions.values()):
                continue
            was_ready = model.state is ModelState.READY
            self._build_ensemble(model)
            if was_ready != (model.state is ModelState.READY):
                self._refresh_dependents(model.name, seen)

    async def _retire(self, model: Model, reason: str) -> None:
        for entry in model.versions.values():
            entry.state, entry.reason = ModelState.UNLOADING, reason
        await asyncio.gather(
            *(self._stop_version(e) for e in model.versions.values()), return_exceptions=True
        )
        for entry in model.versions.values():
            entry.state = ModelState.UNAVAILABLE
        if not model.versions:
            model.reason = reason

    async def _build(
        self,
        name: str,
        folder: Path,
        override: ModelConfig | None = None,
        publish: bool = False,
    ) -> Model:
        """Build a model; cancelled (an unload, the server stopping), its workers are killed.
        `publish`: the model is in `models` (LOADING) while it loads."""
        model = Model(name, folder, ModelConfig(name=name))
        if publish:
            self.models[name] = model
        try:
            return await self._build_into(model, override)
        except asyncio.CancelledError:
            log.info("model '%s': its load was cancelled", name)
            await self._abandon(model, "its load was cancelled")
            raise
        except Exception as exc:  # a bug, or what nothing foresaw: the model only is lost
            log.exception("model '%s': its load failed", name)
            await self._abandon(model, f"internal error: {type(exc).__name__}: {exc}")
            return model

    async def _abandon(self, model: Model, reason: str) -> None:
        """A load that cannot finish: every version UNAVAILABLE with `reason`, its workers
        killed (none is left running for a model that never served)."""
        for entry in model.versions.values():
            entry.state, entry.reason = ModelState.UNAVAILABLE, reason
        if not model.versions:
            model.reason = reason
        await asyncio.gather(
            *(self._stop_version(e, 0.0) for e in model.versions.values()),
            return_exceptions=True,
        )

    async def _build_into(self, model: Model, override: ModelConfig | None) -> Model:
        """Two phases: one worker per version describes the model (its signature, or the config
        its own `auto_complete_config` completed); the config is completed once; then every
        instance starts with the completed config."""
        name, folder = model.name, model.directory
        try:
            model.config = model_config_for(
                name, folder, override, self.config_name, self.auto_complete
            )
            confine_model_files(
                model.config,
                folder,
                self.repositories + self.op_library_roots,
                from_request=override is not None,
            )
            self._validate(model.config)
            model.labels = output_labels(model.config, folder)
            model.execution_timeout_s = execution_timeout(model.config, self.execution_timeout_s)
            model.placement = self._placement(model.config)
            if model.config.response_cache.enable and self.response_cache is None:
                log.warning(
                    "model '%s' enables response_cache, but the server has no cache "
                    "(--cache-config local,size=BYTES): its responses are not cached",
                    name,
                )
            available = version_folders(folder)
            versions = select_versions(model.config, available)
            if not is_ensemble(model.config):
                self._check_instance_count(name, model.config, len(versions), model.placement)
        except OpserveError as exc:
            model.reason = exc.message
            log.error("model '%s' is unavailable: %s", name, exc.message)
            return model
        if not versions:
            model.reason = no_versions_reason(model.config, folder, available)
            log.error("model '%s' is unavailable: %s", name, model.reason)
            return model
        for number in versions:
            model.versions[number] = ModelVersion(name, number, folder / str(number))
        if is_ensemble(model.config):
            self._build_ensemble(model)
            return model
        described = await asyncio.gather(
            *(self._describe(model, v) for v in model.versions.values())
        )
        description = next((d for d in described if d is not None), None)
        if description is not None:
            try:
                self._complete(model, description)
                model.schema = ModelSchema.from_config(model.config)
                if model.config.model_warmup:  # built (and checked) once for every instance
                    model.warmup = warmup_samples(model.config, model.schema, model.directory)
            except OpserveError as exc:
                self._make_unavailable(model, exc.message)
        loading = ModelState.LOADING
        await asyncio.gather(
            *(
                self._start_instances(model, v)
                for v in model.versions.values()
                if v.state is loading
            )
        )
        await asyncio.gather(
            *(self._open(model, v) for v in model.versions.values() if v.state is loading)
        )
        return model

    def _check_instance_count(
        self, name: str, config: ModelConfig, versions: int, placement: Placement
    ) -> None:
        """Refuse a config whose instances (one worker process each, in every version) pass
        --max-instances-per-model, or would pass --max-instances-total beside the workers of
        the other models (a model being reloaded does not count against itself). Instances in
        a shared worker are no processes: they count against the first bound only."""
        per_version = sum(g.count for g in config.instance_group) or 1
        wanted = per_version * versions
        if wanted > self.max_instances_per_model:
            raise InvalidArgumentError(
                f"model '{name}' asks for {wanted} instances ({per_version} per version, "
                f"{versions} version(s)), more than --max-instances-per-model "
                f"{self.max_instances_per_model} allows"
            )
        if placement.shared is not None:
            return
        running = sum(
            isinstance(worker, WorkerProcess)
            for other in self.models.values()
            if other.name != name
            for entry in other.versions.values()
            for worker in entry.workers
        )
        if running + wanted > self.max_instances_total:
            raise InvalidArgumentError(
                f"model '{name}' asks for {wanted} instances, but {running} of the "
                f"--max-instances-total {self.max_instances_total} are in use by other models"
            )

    async def _open(self, model: Model, entry: ModelVersion) -> None:
        """A version whose instances are loaded: each runs the warm-up samples, then serves."""
        decoupled = model.config.model_transaction_policy.decoupled
        entry.scheduler = scheduler_for(
            entry.label, model.config, entry.stats, decoupled, model.directory
        )
        try:
            # the load's bound holds for warm-up too: an execute that never returns (or a
            # decoupled model that never sends its final flag) cannot keep the model LOADING
            await asyncio.wait_for(
                asyncio.gather(*(self._warm_up(model, entry, w) for w in entry.workers)),
                self.load_timeout_s,
            )
        except asyncio.TimeoutError:
            await self._fail_version(
                entry,
                f"its warm-up did not finish within {self.load_timeout_s:g} s "
                "(--model-load-timeout-secs); its workers were stopped",
                stop_within_s=0.0,
            )
            return
        except OpserveError as exc:
            await self._fail_version(entry, exc.message)
            return
        for worker in entry.workers:
            entry.scheduler.add_instance(worker)
        entry.state = ModelState.READY
        log.info(
            "%s is READY (op libraries: %s; %s)",
            entry.label,
            entry.op_libraries or "none",
            f"in the shared {model.placement.shared} worker"
            if model.placement.shared
            else "a worker process per instance",
        )

    async def _warm_up(self, model: Model, entry: ModelVersion, worker: Instance) -> None:
        """Run the config's `model_warmup` samples on one instance (not yet serving)."""
        scheduler = entry.scheduler
        if not isinstance(scheduler, Scheduler):
            return
        for sample in model.warmup:
            log.info("%s: warm-up sample '%s' (%d runs)", entry.label, sample.name, sample.count)
            for _ in range(sample.count):
                requests = [replace(r, inputs=list(r.inputs)) for r in sample.requests]
                try:
                    await scheduler.warm_up(worker, requests)
                except OpserveError as exc:
                    raise UnavailableError(
                        f"failed to run warmup sample '{sample.name}': {exc.message}"
                    ) from None

    def _build_ensemble(self, model: Model) -> None:
        """An ensemble holds no worker: it is READY once its graph is valid and agrees with
        the completed configs of its (loaded) step models."""
        try:
            graph = build_graph(model.config)
            validate_io(model.config)
            folders = find_models(self.repositories)
            missing = [name for name in graph.model_names if name not in folders]
            if missing:
                raise InvalidArgumentError(
                    f"ensemble {graph.name} contains models that are not available or "
                    f"ambiguous: {', '.join(missing)}"
                )
            steps = {name: self._step_config(graph, name) for name in graph.model_names}
            # as in Triton: an ensemble is decoupled exactly when one of its steps is (set
            # before the schema, which the dataplane asks whether the model is decoupled)
            decoupled = check_steps(model.config, graph, steps)
            model.config.model_transaction_policy.decoupled = decoupled
            model.schema = ModelSchema.from_config(model.config)
        except OpserveError as exc:
            self._make_unavailable(model, exc.message)
            return
        if self.step_runner is None:
            raise RuntimeError("the model manager has no step runner for ensembles")
        decoupled_steps = frozenset(
            s.index for s in graph.steps if steps[s.model_name].model_transaction_policy.decoupled
        )
        for entry in model.versions.values():
            entry.state, entry.reason = ModelState.READY, ""
            entry.scheduler = EnsembleScheduler(
                entry.label, graph, entry.stats, decoupled_steps, self.step_runner
            )
            log.info("%s is READY (an ensemble of %s)", entry.label, ", ".join(graph.model_names))

    def _step_config(self, graph: EnsembleGraph, name: str) -> ModelConfig:
        """The completed config of a step model, which must be loaded (with the versions the
        steps ask for); Triton's words otherwise."""
        prefix = f"ensemble '{graph.name}' depends on '{name}'"
        step_model = self.models.get(name)
        if step_model is None or step_model.unloaded:
            raise InvalidArgumentError(f"{prefix} which has no loaded version.")
        if step_model.reason:
            raise InvalidArgumentError(
                f"{prefix} which is not valid. Model '{name}' failed with error: "
                f"{step_model.reason}"
            )
        if step_model.state is not ModelState.READY:
            raise InvalidArgumentError(
                f"{prefix} which has no loaded version. Model '{name}' loading failed with "
                f"error: {self.reason(step_model)}"
            )
        for step in graph.steps:
            if step.model_name == name and step.model_version >= 0:
                entry = step_model.versions.get(step.model_version)
                if entry is None or not entry.ready:
                    raise InvalidArgumentError(
                        f"{prefix} whose required version {step.model_version} is not loaded."
                    )
        return step_model.config

    def _validate(self, config: ModelConfig) -> None:
        """Before anything is loaded: Triton's rules (its words; the tensors only as far as
        auto-complete cannot change them), then the fields opserve refuses; then Triton's
        defaults are filled in."""
        check_before_load(config, self.auto_complete, self.gpus)
        _refuse_unsupported_fields(config)
        normalize_model_config(config)

    def _complete(self, model: Model, description: ModelLoaded) -> None:
        """Complete the config from the model's description (phase one's answer), check it
        against the model, fill Triton's defaults and check it whole; with auto-complete off,
        only check it."""
        signature = description.signature
        autocompleted = False
        if self.auto_complete and description.config_json is not None:  # a Python model's own
            completed = config_from_model_json(model.name, description.config_json)
            model.completed = changed_fields(model.config, completed)
            model.config = completed
            _refuse_unsupported_fields(completed, warn=False)
            model.completed += autocomplete(
                model.config, ModelSignature((), ()), self._default_batch(model)
            )
        elif self.auto_complete and signature is not None:
            autocompleted = not model.config.input or not model.config.output
            model.completed = autocomplete(model.config, signature, self._default_batch(model))
        if model.completed:
            log.info("model '%s': auto-completed %s", model.name, ", ".join(model.completed))
        if (
            signature is not None
            and not self.auto_complete
            and not (model.config.input and model.config.output)
        ):
            raise InvalidArgumentError(
                f"model '{model.name}': auto-complete is disabled, so its config must list the "
                "model's inputs and outputs"
            )
        if signature is not None:
            check_against_signature(model.config, signature, autocompleted)
        normalize_instance_groups(model.config, frozenset())
        normalize_model_config(model.config)
        validate_config(model.config, io_complete=True, gpus=self.gpus)
        if model.config.HasField("sequence_batching"):  # the initial state files, read now
            SequenceSettings.from_config(model.config, model.directory)

    def _default_batch(self, model: Model) -> int:
        sizes = self.default_max_batch_size
        return sizes.get(model.config.backend, sizes.get("", DEFAULT_MAX_BATCH_SIZE))

    def _make_unavailable(self, model: Model, reason: str) -> None:
        log.error("model '%s' is unavailable: %s", model.name, reason)
        for entry in model.versions.values():
            entry.state, entry.reason = ModelState.UNAVAILABLE, reason
            self._background(self._stop_version(entry))

    async def _describe(self, model: Model, entry: ModelVersion) -> ModelLoaded | None:
        """Phase one for a version: inspect its op libraries, start its first instance and have
        it describe the model. None when the version cannot load."""
        entry.state, entry.reason = ModelState.LOADING, ""
        try:
            launcher = await self._launcher(model)
            entry.libraries = resolve_model_libraries(
                model.config,
                model.directory,
                entry.directory,
                self.repositories + self.op_library_roots,
            )
            entry.libraries += await self._built_op_libraries(model, launcher)
            await self._inspect(
                model, BACKEND_FRAMEWORKS.get(model.config.backend), entry.libraries, launcher
            )
            described = await self._spawn(model, entry, describe=True)
        except OpserveError as exc:
            reason = exc.message
            op = missing_op_in(reason)
            if op is not None:
                reason += await self._unlisted_library_hint(model, entry, op)
            await self._fail_version(entry, reason)
            return None
        return described  # still LOADING: READY once its instances serve (`_open`)

    async def _unlisted_library_hint(self, model: Model, entry: ModelVersion, op: str) -> str:
        """'; <library> registers <op> ...: add <line>' when a library of the model's framework in
        its folder (or a sibling model's) registers the op its framework did not find."""
        framework = BACKEND_FRAMEWORKS.get(model.config.backend)
        if framework is None:
            return ""
        for path in candidate_libraries(model.directory, entry.libraries):
            if _framework_of(path) == framework:
                report = await inspect_library_async(path)
                if op in report.ops:
                    return "; " + unlisted_library_hint(op, path, model.directory, entry.directory)
        return ""

    async def _start_instances(self, model: Model, entry: ModelVersion) -> None:
        """Phase two for a version: every instance serves with the completed config (the
        first one, which described the model, keeps what it loaded)."""
        count = sum(g.count for g in model.config.instance_group) or 1
        try:
            first = entry.workers[0]
            fields = self._load_fields(model, entry, 0, describe=False)
            loaded = [await first.load(self.load_timeout_s, **fields)]
            loaded += await asyncio.gather(
                *(self._spawn(model, entry, index=i) for i in range(1, count))
            )
        except (OpserveError, IndexError) as exc:
            message = exc.message if isinstance(exc, OpserveError) else "its worker is gone"
            await self._fail_version(entry, message)
            return
        entry.op_libraries = loaded[0].op_libraries

    async def _fail_version(
        self, entry: ModelVersion, reason: str, stop_within_s: float = 10.0
    ) -> None:
        """`stop_within_s`: 0 kills its workers at once (one that hangs would not unload)."""
        entry.state, entry.reason = ModelState.UNAVAILABLE, reason
        log.error("%s is UNAVAILABLE: %s", entry.label, reason)
        await self._stop_version(entry, stop_within_s)

    def _instance_name(self, model: Model, index: int) -> str:
        """Triton's instance names: `<group name>_<index in the group>`."""
        for number, group in enumerate(model.config.instance_group):
            if index < max(group.count, 1):
                return f"{group.name or f'{model.name}_{number}'}_{index}"
            index -= max(group.count, 1)
        return f"{model.name}_{index}"

    def _load_fields(
        self, model: Model, entry: ModelVersion, index: int, describe: bool
    ) -> dict[str, Any]:
        framework = BACKEND_FRAMEWORKS.get(model.config.backend)
        return {
            "model_name": model.name,
            "version": entry.version,
            "config": model.config.SerializeToString(),
            "config_json": json.dumps(config_to_json(model.config), separators=(",", ":")),
            "model_dir": str(model.directory),
            "version_dir": str(entry.directory),
            "instance_name": self._instance_name(model, index),
            "describe": describe,
            "op_libraries": [str(p) for p in entry.libraries],
            "server_op_libraries": [str(p) for p in self.server_op_libraries.get(framework, [])],
            "preloaded_libraries": [str(p) for p in self.preloaded.get(framework, [])],
            "repository": str(model.directory.parent),
            "library_frameworks": {
                str(p): f for p in entry.libraries if (f := _framework_of(p)) is not None
            },
            "auto_complete": self.auto_complete,
        }

    async def _spawn(
        self, model: Model, entry: ModelVersion, index: int = 0, describe: bool = False
    ) -> ModelLoaded:
        """One more instance of a version: a worker process with the model loaded (or, in
        phase one, described)."""
        worker = await self._new_worker(model, entry)
        await worker.start()
        fields = self._load_fields(model, entry, index, describe)
        return await worker.load(self.load_timeout_s, **fields)

    async def _new_worker(self, model: Model, entry: ModelVersion) -> Instance:
        """A worker for an instance of `entry`, not started yet (in `entry.workers` already,
        so that stopping the version stops it too): a slot of the shared worker of its key, or
        a process of its own."""
        worker: Instance
        if model.placement.shared is not None:
            worker = SharedInstance(
                self.shared,
                model.placement.shared,
                entry.label,
                self._worker_exited,
                model.execution_timeout_s,
            )
            entry.workers.append(worker)
            return worker
        worker = WorkerProcess(
            entry.label,
            self.ring_capacity,
            self._worker_exited,
            await self._launcher(model),
            self.host,
            title=f"{model.name}:{entry.version}",
            execution_timeout_s=model.execution_timeout_s,
        )
        entry.workers.append(worker)
        return worker

    def _placement(self, config: ModelConfig) -> Placement:
        framework = BACKEND_FRAMEWORKS.get(config.backend)
        outside = framework is not None and bool(
            self.server_op_libraries.get(framework) or self.preloaded.get(framework)
        )
        return place(config, self.sharing, outside, frozenset(self.gpus))

    def _shared_process(
        self, key: str, on_exit: Callable[[WorkerProcess, str], None]
    ) -> WorkerProcess:
        """The process of a shared worker (`SharedWorkers` starts it): the server's interpreter
        and environment."""
        return WorkerProcess(
            f"the models sharing the {key} worker",
            self.ring_capacity,
            on_exit,
            Launcher(env=self._worker_environment()),
            self.host,
            title=f"shared-{key}",
            shared=True,
        )

    async def _launcher(self, model: Model) -> Launcher:
        """How this model's workers start: the server's interpreter, or the model's own
        execution environment (`EXECUTION_ENV_PATH`)."""
        env = self._worker_environment()
        environment = execution_environment(model.config, model.directory)
        if environment is not None:
            return await environment_launcher(environment, env, model.config.backend)
        return Launcher(env=env)

    async def _built_op_libraries(self, model: Model, launcher: Launcher) -> list[Path]:
        """The library built from the op sources the model ships (`OP_LIBRARY_SOURCES`), for
        the framework its worker will run; a cached build is reused."""
        sources = model_op_sources(model.config, model.directory)
        if not sources:
            return []
        framework = BACKEND_FRAMEWORKS.get(model.config.backend)
        if framework is None:
            raise UnavailableError(
                f"model '{model.name}': {SOURCES_PARAMETER} are built for the model's framework, "
                f"and backend '{model.config.backend}' has none; build the library with "
                "`opserve ops build --framework ...` and list it in model_operations"
            )
        try:
            built = await asyncio.to_thread(build_library, sources, framework, launcher)
        except OpserveError as exc:
            raise UnavailableError(f"model '{model.name}': {exc.message}") from None
        log.info(
            "model '%s': op library %s %s for %s %s",
            model.name,
            built.path,
            "reused" if built.cached else "built",
            framework,
            built.framework_version,
        )
        return [built.path]

    async def _inspect(
        self, model: Model, framework: str | None, libraries: list[Path], launcher: Launcher
    ) -> None:
        """Every library this model's worker would load, inspected first in throwaway processes
        under the worker's own interpreter: a mismatch or a collision is an error naming the
        library, never a crashed worker."""
        shared = self.server_op_libraries.get(framework, []) + self.preloaded.get(framework, [])
        if not libraries and not shared:
            return
        reports = await asyncio.gather(
            *(inspect_library_async(p, launcher) for p in [*libraries, *shared])
        )
        problems = [problem for report in reports for problem in report.problems]
        for report in reports[: len(libraries)]:
            mismatch = framework_mismatch(report, model.name, model.config.backend)
            if mismatch is not None:
                problems.append(mismatch)
        problems += collisions(list(reports))
        if problems:
            raise UnavailableError("; ".join(problems))

    def _worker_environment(self) -> dict[str, str]:
        """Preloaded op libraries reach their framework's workers through `LoadModel`, loaded
        after the framework; only libraries of no framework (an allocator, say) stay in
        LD_PRELOAD, for every worker."""
        env = {k: v for k, v in os.environ.items() if k not in (PRELOAD_HANDOFF, "LD_PRELOAD")}
        others = self.preloaded.get(None, [])
        if others:
            env["LD_PRELOAD"] = ":".join(str(p) for p in others)
        return env

    async def _stop_version(self, entry: ModelVersion, timeout_s: float = 10.0) -> None:
        """Stop every instance of a version (queued requests fail, in-flight ones finish);
        a worker still there after `timeout_s` is killed."""
        entry.stopped = True
        workers, entry.workers = entry.workers, []
        if entry.scheduler is not None:
            await entry.scheduler.close()
        await asyncio.gather(*(w.stop(timeout_s) for w in workers), return_exceptions=True)

    def _background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _worker_exited(self, worker: Instance, reason: str) -> None:
        """A serving instance died: take it out of service and start another in its place.
        The version stays READY while another instance serves."""
        for model in self.models.values():
            for entry in model.versions.values():
                if worker not in entry.workers:
                    continue
                entry.workers.remove(worker)
                scheduler = entry.scheduler
                if not isinstance(scheduler, Scheduler) or worker not in scheduler.instances:
                    continue  # not serving yet: whoever starts it sees the failure
                scheduler.remove_instance(worker)
                if entry.state is not ModelState.READY or entry.stopped:
                    continue
                if not scheduler.instances:
                    entry.state = ModelState.UNAVAILABLE
                entry.reason = f"the worker process of an instance {reason}; restarting it"
                self._background(self._replace(model, entry, scheduler))

    async def _replace(self, model: Model, entry: ModelVersion, scheduler: Scheduler) -> None:
        """Start an instance in place of one that died; a failed start is tried again, with a
        delay that doubles each time, until it succeeds or the version is stopped."""
        failures = 0
        while True:
            await asyncio.sleep(restart_delay(failures))
            if entry.stopped:
                return
            worker: Instance | None = None
            try:
                worker = await self._new_worker(model, entry)
                await worker.start()
                fields = self._load_fields(model, entry, len(scheduler.instances), False)
                await worker.load(self.load_timeout_s, **fields)
                await self._warm_up(model, entry, worker)
            except (OpserveError, OSError) as exc:
                failures += 1
                message = exc.message if isinstance(exc, OpserveError) else str(exc)
                entry.reason = (
                    f"restarting the worker of an instance failed ({failures} "
                    f"{'time' if failures == 1 else 'times'}): {message}; trying again in "
                    f"{restart_delay(failures):g} s"
                )
                log.error("%s: %s", entry.label, entry.reason)
                if worker is not None:
                    if worker in entry.workers:
                        entry.workers.remove(worker)
                    await worker.stop(0.0)
                continue
            if entry.stopped:  # unloaded meanwhile
                await worker.stop()
                return
            scheduler.add_instance(worker)
            if not any(w not in scheduler.instances for w in entry.workers):
                entry.reason = ""  # every instance serves again
            entry.state = ModelState.READY
            log.info("%s is READY again after its worker was restarted", entry.label)
            return

    # shutting down -----------------------------------------------------------------------------
    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Unload every model at exit: loads under way are cancelled, restarts stop, and a
        worker that has not ended after `timeout_s` (a hung one) is killed."""
        for task in list(self._tasks):
            task.cancel()
        builds = [b for b in self._builds.values() if not b.done()]
        for build in builds:
            build.cancel()
        await asyncio.gather(*builds, return_exceptions=True)
        for model in self.models.values():
            for entry in model.versions.values():
                entry.state = ModelState.UNLOADING
        versions = [e for m in self.models.values() for e in m.versions.values()]
        await asyncio.gather(
            *(self._stop_version(e, timeout_s) for e in versions), return_exceptions=True
        )
        await self.shared.close()


def _refuse_unsupported_fields(config: ModelConfig, warn: bool = True) -> None:
    """Config fields opserve does not honour: refused ones raise, ignored ones are logged."""
    findings = check_fields(config)
    if warn:
        for warning in findings.warnings:
            log.warning("%s", warning)
    if findings.errors:
        raise UnavailableError("; ".join(findings.errors))


def fingerprint(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """What a model folder holds: every file's path, size and time of change (the later of its
    modification and status change, as Triton reads it: a file copied over another with its
    modification time kept is a change)."""
    entries = []
    for path in sorted(folder.rglob("*")):
        try:
            if path.is_file():
                stat = path.stat()
                changed = max(stat.st_mtime_ns, stat.st_ctime_ns)
                entries.append((str(path.relative_to(folder)), stat.st_size, changed))
        except OSError:
            continue
    return tuple(entries)


def ensemble_steps(name: str, folder: Path, config: ModelConfig | None = None) -> list[str] | None:
    """The models an ensemble's steps use; None when the folder holds no (readable) ensemble."""
    copy = None
    if config is not None:
        copy = ModelConfig()
        copy.CopyFrom(config)
    try:
        config = model_config_for(name, folder, copy)
    except OpserveError:
        return None
    if not is_ensemble(config):
        return None
    return list(dict.fromkeys(s.model_name for s in config.ensemble_scheduling.step))


def _framework_of(library: Path) -> str | None:
    try:
        return library_framework(library)
    except OpserveError:
        return None


def _by_framework(libraries: Iterable[Path]) -> dict[str | None, list[Path]]:
    grouped: dict[str | None, list[Path]] = {}
    for library in libraries:
        grouped.setdefault(_framework_of(library), []).append(library)
    return grouped
