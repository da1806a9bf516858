"""The reload of ``anomalyd.service.Service`` (SIGHUP, ``systemctl reload``): the reload
thread reads the configuration again, plans the change (``anomalyd.reload``), loads and
warms the models that changed beside the serving ones, and hands it all to the pipeline
thread, which takes it between two passes; all of it, or on any failure none.

Separate from the lifecycle (``anomalyd.service``, which starts the reload thread) because
it is a thread of its own with its own all-or-nothing hand-over protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from anomalyd.config import Config, load_config, model_entries
from anomalyd.errors import AnomalydError, ConfigError
from anomalyd.logsetup import reconfigure as reconfigure_logging
from anomalyd.model import LoadedModel
from anomalyd.reload import ReloadPlan, file_digest, plan_reload
from anomalyd.routing import ModelRouter
from anomalyd.service_state import ServiceState, Stages, log

#: How long a reload waits for the pipeline thread to take what it hands over.
_HANDOVER_TIMEOUT_S = 30.0


@dataclass(slots=True)
class _Handover:
    """What a reload hands the pipeline thread: the configuration to run with (None: no
    live change for the pipeline) and a new model (None: keep serving the current one).
    The pipeline thread fills ``error`` if it could not take them (then it changed nothing)."""

    config: Config | None
    model: LoadedModel | None
    error: str | None = None
    #: With several models: the reloaded ones, by name (the others keep serving).
    models: dict[str, LoadedModel] = field(default_factory=dict)


class ReloadMixin(ServiceState):
    """``Service``'s reload thread (``_run_reload``) and the pipeline thread's side of the
    hand-over (``_take_handover``)."""

    def _run_reload(self) -> None:
        """The reload thread: read the configuration again, load the model if it changed, and
        hand what changes live to the pipeline thread; all of it, or on any failure none."""
        self.notifier.reloading()
        source = str(self._config_path) if self._config_path is not None else "embedded defaults"
        try:
            new = load_config(self._config_path, self._overrides)
        except ConfigError as exc:
            why = str(exc) if source in str(exc) else f"{source}: {exc}"
            self._reload_failed("configuration reload", why)
            return
        plan = plan_reload(self.config, new)
        if (model_entries(new) is None) != (model_entries(self.config) is None):
            # The pipelines are built for one or for several models at the start.
            self._reload_failed(
                "reload", f"{source}: switching between [model] and [[models]] needs a restart"
            )
            return
        if model_entries(plan.config) is not None:
            self._run_reload_models(plan, source)
            return
        # The model file is read again only when it (or how it is run) changed; an
        # unreadable one is loaded anyway, so that the error says what is wrong with it.
        digest = file_digest(plan.config.model.path)
        model: LoadedModel | None = None
        if plan.live_in("model") or digest is None or digest != self._model_digest:
            try:
                model = self._load_warm(plan.config)
            except AnomalydError as exc:
                self._reload_failed("model reload", str(exc), model=True)
                return
            except Exception as exc:  # anything ORT throws must not take the server down
                log.exception("model reload failed")
                self._reload_failed("model reload", repr(exc), model=True)
                return
        if plan.unchanged and model is None:
            log.info(
                "reload: nothing changed (configuration: %s; model file %s)", source, plan.config.model.path
            )
            self.metrics.config_reloads.labels(result="success").inc()
            self.notifier.ready(self._status_line())
            return
        error = self._hand_over(_Handover(plan.config if plan.live else None, model))
        if error is not None:
            self._reload_failed(
                "model reload" if model is not None else "reload", error, model=model is not None
            )
            return
        self._reload_done(plan, model, digest)

    def _run_reload_models(self, plan: ReloadPlan, source: str) -> None:
        """The reload thread, with several models: load again each model whose file changed
        (or cannot be read: the error then says why), and hand them over with the live
        configuration changes. ``[[models]]`` itself needs a restart to change (the plan
        keeps the running entries), so the same models keep their names."""
        entries = model_entries(plan.config)
        assert entries is not None
        loaded: dict[str, LoadedModel] = {}
        digests: dict[str, str | None] = {}
        for entry in entries:
            digest = file_digest(entry.path)
            if digest is not None and digest == self._model_digests.get(entry.name):
                continue
            try:
                loaded[entry.name] = self._load_warm(plan.config.for_model(entry))
            except Exception as exc:  # AnomalydError, or anything ORT throws
                if not isinstance(exc, AnomalydError):
                    log.exception("model %s reload failed", entry.name)
                self._reload_failed(f"model {entry.name} reload", str(exc), model=True)
                return
            digests[entry.name] = digest
        if plan.unchanged and not loaded:
            log.info("reload: nothing changed (configuration: %s; no model file changed)", source)
            self.metrics.config_reloads.labels(result="success").inc()
            self.notifier.ready(self._status_line())
            return
        error = self._hand_over(_Handover(plan.config if plan.live else None, None, models=loaded))
        if error is not None:
            self._reload_failed("model reload" if loaded else "reload", error, model=bool(loaded))
            return
        self._model_digests.update(digests)
        for name, model in loaded.items():
            log.info("model %s reloaded: now serving %s", name, model.contract.model_version)
        self._reload_done(plan, None, None, models_reloaded=bool(loaded))

    def _hand_over(self, handover: _Handover) -> str | None:
        """Give the pipeline thread what a reload changes and wait until it has taken it.
        Returns None once it is applied, else why not (then none of it was applied)."""
        self._handed_over.clear()
        with self._handover_lock:
            self._handover = handover
        self._queue.wake()
        if not self._handed_over.wait(_HANDOVER_TIMEOUT_S):
            with self._handover_lock:
                if self._handover is handover:  # never taken: take it back
                    self._handover = None
                    return f"the pipeline thread did not take it within {_HANDOVER_TIMEOUT_S:.0f} s"
            self._handed_over.wait()  # taken meanwhile: the pipeline thread is applying it
        return handover.error

    def _take_handover(self, pipeline: Stages) -> None:
        """On the pipeline thread, between two passes: apply what a reload handed over."""
        with self._handover_lock:
            handover, self._handover = self._handover, None
        if handover is None:
            return
        applied = False
        try:
            if isinstance(pipeline, ModelRouter):
                self._take_models_handover(pipeline, handover)
                applied = True
                return
            if handover.config is not None:
                try:
                    pipeline.apply_config(handover.config)
                except ValueError as exc:  # Detector.reconfigure checks before it changes anything
                    handover.error = f"the detector refused the new [detector]: {exc}"
                    return
                if self._publisher is not None:
                    self._publisher.set_output(handover.config.output)
            new = handover.model
            if new is not None:
                pipeline.swap_model(new)  # pending windows are scored by the old model first
                self.model = new
                if self._publisher is not None:
                    self._publisher.set_model(new.contract.feature_names, new.contract.model_version)
            self._announce_models()
            applied = True
        finally:
            if not applied and handover.error is None:
                handover.error = "the pipeline thread failed while applying it (see above)"
            self._handed_over.set()

    def _take_models_handover(self, router: ModelRouter, handover: _Handover) -> None:
        """``_take_handover`` with several models: the configuration, then each new model."""
        if handover.config is not None:
            try:
                router.apply_config(handover.config)
            except ValueError as exc:  # checked for every model before any changed
                handover.error = f"the detector refused the new [detector]: {exc}"
                return
            for publisher in self._model_publishers.values():
                publisher.set_output(handover.config.output)
        for name, new in handover.models.items():
            router.swap_model(name, new)  # its pending windows are scored by its old model first
            self.models[name] = new
            self._model_publishers[name].set_model(new.contract.feature_names, new.contract.model_version)
        self.model = next(iter(self.models.values()))
        self._announce_models()

    def _reload_done(
        self,
        plan: ReloadPlan,
        model: LoadedModel | None,
        digest: str | None,
        *,
        models_reloaded: bool = False,
    ) -> None:
        """The reload thread, once the pipeline thread took its part: the rest, and the log."""
        cfg = plan.config
        if plan.live_in("logging"):
            reconfigure_logging(cfg.logging.level, cfg.logging.format)
        self.config = cfg
        for change in plan.restart:
            log.warning("reload: needs a restart: %s (the running value stays until then)", change.describe())
        if plan.live:
            log.info("reload: applied %s", "; ".join(c.describe() for c in plan.live))
        if model is not None:
            self._model_digest = digest
            log.info("model reloaded: now serving %s", model.contract.model_version)
        log.info(
            "reload done: %s, static threshold %.6g%s",
            self._status_line(),
            self.threshold,
            f"; {len(plan.restart)} change(s) wait for a restart" if plan.restart else "",
        )
        # Counted last: whoever watches the counters finds everything above done.
        if model is not None or models_reloaded:
            self.metrics.model_reloads.labels(result="success").inc()
        self.metrics.config_reloads.labels(result="success").inc()
        self.notifier.ready(self._status_line())

    def _reload_failed(self, what: str, why: str, *, model: bool = False) -> None:
        """Nothing of the reload was applied: say why at ERROR, count it (``model``: the
        model part failed, which ``anomalyd_model_reloads_total`` counts too)."""
        serving = self.model.contract.model_version if self.model else "?"
        log.error("%s failed, still serving %s with the running configuration: %s", what, serving, why)
        if model:
            self.metrics.model_reloads.labels(result="failure").inc()
        self.metrics.config_reloads.labels(result="failure").inc()
        self.notifier.ready(self._status_line())
