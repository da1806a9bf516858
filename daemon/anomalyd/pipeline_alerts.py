"""The devices' alert states in ``anomalyd.pipeline.Pipeline`` (``anomalyd.alerts``):
publishing them, operator commands, re-asserting every state after a (re)connect, and
reconciling what the broker retains with what the pipeline knows, which in a partitioned
fleet is also the handover between instances (a moved device's alert is adopted, not
raised again; a snapshot's devices another instance owns now are left out).

Separate from the flow (``anomalyd.pipeline``, whose decisions and housekeeping produce
the changes published here) because this is where the pipeline meets state it did not
decide itself: the operator's, the broker's, the previous owner's.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import numpy.typing as npt

from anomalyd.alerts import UNKNOWN, AlertRecord, OperatorAction, RetainedState
from anomalyd.commands import IN_SERVICE, OUT_OF_SERVICE, REBASELINE, SHELVE, UNSHELVE, Command
from anomalyd.pipeline_state import PipelineState, log
from anomalyd.snapshot import Snapshot

#: Alert states re-asserted per housekeeping round (about a second) after a reconnect: ten
#: thousand devices are spread over a few seconds, so the client's bounded out-queue of
#: acknowledged messages and the broker take them in stride.
_REASSERT_PER_ROUND = 2000


class AlertStatesMixin(PipelineState):
    """``Pipeline``'s alert states: publish, commands, re-assert, reconcile, handover."""

    def _forget(self, devices: list[str], reason: str) -> None:
        """Stop tracking ``devices``: each becomes ``unknown`` with ``reason``."""
        records = self.detector.forget(devices, reason, time.time())
        if self.sink is not None:
            self.sink.forget(devices)
            self._publish_states(records)

    def _publish_states(self, records: list[AlertRecord]) -> None:
        if records and self.sink is not None:
            try:
                self.sink.publish_states(records)
            except Exception:
                self.metrics.pipeline_errors.labels(stage="publish").inc()
                log.exception("publishing %d alert states failed", len(records))

    def apply_command(self, command: Command, now: float | None = None) -> bool:
        """Apply an operator command (``anomalyd.commands``); False if the device is not tracked."""
        device = command.device
        if not (self.detector.knows(device) or self.buffers.readings(device) > 0):
            return False
        at = time.time() if now is None else now
        action = OperatorAction(command.verb, command.by, command.why, at)
        det = self.detector
        verb = command.verb
        if verb == SHELVE:
            assert command.duration_s is not None
            record = det.shelve(device, at + command.duration_s, action)
        elif verb == UNSHELVE:
            record = det.unshelve(device, action)
        elif verb == REBASELINE:
            record = det.rebaseline(device, action)
        elif verb == OUT_OF_SERVICE:
            record = det.set_out_of_service(device, True, action)
        elif verb == IN_SERVICE:
            record = det.set_out_of_service(device, False, action)
        else:  # parse_command admits only the verbs above
            raise ValueError(f"unknown verb {verb!r}")
        if record is not None:
            self._publish_states([record])
        return True

    def request_reassert(self) -> None:
        """Re-publish every device's alert state over the next passes (after a (re)connect)."""
        self._reassert = self.detector.devices()
        self._reassert.reverse()  # popped from the end: oldest-known devices first

    def reconcile(self, retained: list[RetainedState]) -> None:
        """The broker retains these alert messages (``anomalyd.alerts.RetainedStates``): make
        what it shows agree with what this daemon knows.

        A single daemon (no ``[cluster]``): every device it holds no state for, and which the
        broker shows as other than ``unknown``, becomes ``unknown`` (``no_state``, or
        ``warming_up`` if it has readings here) until its first full window decides; a device
        it holds a state for keeps it (every state is re-asserted on connect).

        An instance of a partitioned fleet answers only for the devices it owns: the others'
        states are their owners' and are left alone. For its own:

        * no state here, and the broker shows ``anomalous``, ``shelved`` or
          ``out_of_service`` (the previous owner's alert or an operator's decision): the
          state is adopted (``Detector.adopt``) and nothing is published, since the broker
          already shows it with its identity (device and ``since``): the alert is neither
          dropped nor raised again. Any other state (``normal``, ``cadence_mismatch``, a
          message it cannot read) becomes ``unknown`` as for a single daemon: this instance
          has no verdict yet, and a ``normal`` it did not decide would claim one;
        * a state here that the broker's message has overtaken (``Detector.claim_is_newer``:
          a snapshot from before another instance owned the device) is dropped, and the
          device is handled as one without a state: a newer word from the device's owner
          wins over older memory here, while a state here at least as new as the message
          (or the message being what this daemon published) wins over it;
        * an alert raised here only because the device's readings were scored before its
          retained state arrived keeps the identity of the alert the broker shows
          (``Detector.continue_alert``), and the corrected state is published.
        """
        det = self.detector
        owns = self._owns
        now = time.time()
        unknown: list[AlertRecord] = []
        corrected: list[AlertRecord] = []
        adopted = overtaken = 0
        for told in retained:
            device = told.device
            if owns is None:  # a single daemon: the state here, if any, stands
                claim = told
                if det.knows(device):
                    continue
            else:
                if not owns(device):
                    continue  # another instance's device
                claim = self._as_for_this_model(told)
                if det.knows(device):
                    record = det.continue_alert(claim, self._peak_contributions(claim))
                    if record is not None:
                        corrected.append(record)
                        continue
                    if not det.claim_is_newer(claim):
                        continue
                    det.discard(device)
                    overtaken += 1
                if det.adopt(claim, self._peak_contributions(claim)):
                    adopted += 1
                    if self.buffers.readings(device) == 0:
                        self._adopted[device] = time.monotonic()
                    continue
            if claim.state != UNKNOWN:
                reason = "warming_up" if self.buffers.readings(device) > 0 else "no_state"
                unknown.append(AlertRecord(device, UNKNOWN, UNKNOWN, now, now, reason=reason))
        if overtaken:
            log.info(
                "%d devices' states here were older than what their owner published since: replaced",
                overtaken,
            )
        if adopted:
            log.info("adopted the retained alert states of %d devices that moved here", adopted)
        if corrected:
            log.info(
                "%d alerts raised here were already raised by the devices' previous owner: kept their since",
                len(corrected),
            )
        if unknown:
            log.info(
                "%d alert states retained by the broker belong to devices without a state here: now unknown",
                len(unknown),
            )
        self._publish_states(corrected + unknown)

    def _as_for_this_model(self, claim: RetainedState) -> RetainedState:
        """``claim`` without its peak if another model version published it: a peak is a
        score, and another model's scores are on another scale."""
        version = claim.model_version
        if version is None or version == self.model.contract.model_version:
            return claim
        return dataclasses.replace(claim, peak_score=math.nan, peak_ts=math.nan, contributions=None)

    def _peak_contributions(self, claim: RetainedState) -> npt.NDArray[np.float32] | None:
        """The claim's contributions at the peak in the model's feature order (None unless
        they name exactly the model's features)."""
        given = claim.contributions
        names = self.model.contract.feature_names
        if given is None or set(given) != set(names) or len(given) != len(names):
            return None
        return np.asarray([given[name] for name in names], np.float32)

    def _expire_adopted(self, now_mono: float) -> None:
        """Adopted devices that sent no reading here for ``stream.idle_evict_s`` are idle, as
        a device with a window would be (the buffers evict those, and this detector state
        without a window would otherwise never go): each becomes ``unknown``/``idle``."""
        adopted = self._adopted
        if not adopted:
            return
        idle_s = self.config.stream.idle_evict_s
        idle: list[str] = []
        for device, since_mono in list(adopted.items()):
            if self.buffers.readings(device) > 0 or not self.detector.knows(device):
                del adopted[device]  # it has a window now (the buffers' rule applies), or is gone
            elif now_mono - since_mono >= idle_s:
                del adopted[device]
                idle.append(device)
        if idle:
            self._forget(idle, "idle")
            self.metrics.devices_evicted.labels(cause="idle").inc(len(idle))
            log.info("forgot %d adopted devices that sent nothing here for %.0f s", len(idle), idle_s)

    def _owned_part(self, snap: Snapshot) -> Snapshot:
        """``snap`` without the devices this instance does not own (a snapshot taken before a
        rebalance): their states are now another instance's, and restoring them here would
        re-assert a stale state over the owner's and later announce them idle."""
        owns = self._owns
        devices = snap.buffers.get("devices") if isinstance(snap.buffers, dict) else None
        if owns is None or not isinstance(devices, np.ndarray) or devices.ndim != 1:
            return snap  # nothing to leave out, or malformed: the import says what is wrong
        n = devices.shape[0]
        keep = np.fromiter((owns(str(d)) for d in devices.tolist()), np.bool_, n)
        if keep.all():
            return snap
        log.info(
            "left %d devices of the snapshot to the instances that own their partitions now",
            n - int(np.count_nonzero(keep)),
        )
        buffers = {
            k: v[keep] if isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == n else v
            for k, v in snap.buffers.items()
        }
        return dataclasses.replace(snap, buffers=buffers)

    def _reassert_some(self) -> None:
        pending = self._reassert
        if not pending:
            return
        records: list[AlertRecord] = []
        for _ in range(min(_REASSERT_PER_ROUND, len(pending))):
            record = self.detector.record(pending.pop())
            if record is not None:
                records.append(record)
        self._publish_states(records)

    def forget_all(self, reason: str) -> None:
        """Every tracked device becomes ``unknown`` (a stop without a snapshot to resume from)."""
        self._forget(self.detector.devices(), reason)
