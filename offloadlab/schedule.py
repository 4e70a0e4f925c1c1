"""The staging-slot schedule of prefetch offload, defined once for the simulator and the runtime.

A step runs ``n`` offloaded layers (numbered m = 0..n-1 in layer order; ``Placement.offloaded_layers``)
through ``ring = min(slots, n)`` static GPU staging slots on one copy stream:

- **Binding**: offloaded layer m always computes from slot ``m % ring``, in every step. The binding is
  static because the layer's parameters are views of its slot (vLLM's prefetch backend points them at
  ``StaticBufferPool`` buffers once, ``slot_idx = idx % prefetch_step``, so CUDA graphs see fixed
  addresses: vllm/model_executor/offloader/prefetch.py, ``post_init``).
- **Copies within a step**: the first ``ring`` copies are issued at the step's start, after the whole
  previous step (the copy stream joins the compute stream). Copy m >= ring goes into the slot layer
  m - ring just read, so it is issued right after that layer and waits for its read.
- **Wrap** (vLLM's prefetch backend preloads the next step): the next step's copy w < ring goes into
  slot w, whose last reader in this step is ``last_reader(w)``, the largest m < n with m % ring == w.
  The copy must wait for that read. Copies stay in order on the one copy stream, so copy w is issued
  once layers ``last_reader(0..w)`` have all been read (``wrapped_after``).

When ``n % ring == 0`` the last readers are n-ring, ..., n-1 in slot order and the wrap copy into slot
w follows layer n-ring+w, exactly ``(index + prefetch_step) % n`` as vLLM starts it. Otherwise vLLM's
``next_index = (index + prefetch_step) % n`` starts the next step's copy into a slot that a later layer
of the current step still reads (prefetch.py forks the copy from the compute stream after ``index`` only):
the race this schedule removes. E.g. n=3, ring=2: after layer 1, vLLM copies next step's layer 0 into
slot 0 while layer 2 (slot 0) has yet to run; here that copy waits for layer 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

from .checks import check_bool, check_int


@dataclass(frozen=True)
class SlotSchedule:
    """Which slot each offloaded layer uses and which read each copy into a slot must follow."""

    offloaded: int  # n: offloaded layers per step
    slots: int  # staging slots asked for (vLLM's --offload-prefetch-step, the paper's buffers)
    wrap: bool = False  # the next step's first copies are issued during this step

    def __post_init__(self):
        for name, low in (("offloaded", 0), ("slots", 1)):
            check_int(f"SlotSchedule.{name}", getattr(self, name), low)
        check_bool("SlotSchedule.wrap", self.wrap)

    @property
    def ring(self) -> int:
        """Slots in use: no more than there are offloaded layers."""
        return min(self.slots, self.offloaded)

    def slot(self, m: int) -> int:
        """The slot offloaded layer m computes from (in every step)."""
        assert 0 <= m < self.offloaded, f"offloaded index {m} outside 0..{self.offloaded - 1}"
        return m % self.ring

    def last_reader(self, slot: int) -> int:
        """The last offloaded layer of a step that reads ``slot``."""
        assert 0 <= slot < self.ring, f"slot {slot} outside 0..{self.ring - 1}"
        return slot + self.ring * ((self.offloaded - 1 - slot) // self.ring)

    def waits_for(self, m: int) -> tuple[int, int] | None:
        """The read the copy of offloaded layer m must be ordered after, as (step delta, layer): the
        same step's m - ring, the previous step's last reader of the slot (wrap), or None: the copy is
        issued at the step's start, after the previous step as a whole."""
        assert 0 <= m < self.offloaded, f"offloaded index {m} outside 0..{self.offloaded - 1}"
        if m >= self.ring:
            return (0, m - self.ring)
        return (-1, self.last_reader(m)) if self.wrap else None

    def first_copies(self) -> range:
        """Copies issued at a step's start (every step without wrap; with wrap only the first)."""
        return range(self.ring)

    def after_read(self, m: int) -> int | None:
        """The same step's copy issued right after offloaded layer m has been read (its slot's next
        layer), or None."""
        return m + self.ring if m + self.ring < self.offloaded else None

    def issuer(self, m: int) -> tuple[int, int] | None:
        """The read right after which the copy of offloaded layer m is issued, as (step delta, layer):
        the same step's m - ring, or, with wrap, the previous step's layer whose ``wrapped_after``
        holds m; None for a copy issued at the step's start."""
        assert 0 <= m < self.offloaded, f"offloaded index {m} outside 0..{self.offloaded - 1}"
        if m >= self.ring:
            return (0, m - self.ring)
        if not self.wrap:
            return None
        return (-1, self._wrap_issued_at[m])

    @cached_property
    def _wrap_issued_at(self) -> tuple[int, ...]:
        """With wrap, per copy w < ring of the next step: the offloaded layer after whose read it is
        issued, the latest of the last readers of slots 0..w (copies stay in order on the one stream)."""
        return tuple(accumulate((self.last_reader(w) for w in range(self.ring)), max))

    def wrapped_after(self, m: int) -> range:
        """With wrap: the next step's copies issued once offloaded layer m has been read (in order:
        copy w goes out when the last readers of slots 0..w have all read)."""
        if not self.wrap or m < self.offloaded - self.ring:
            return range(0)
        ws = [w for w, at in enumerate(self._wrap_issued_at) if at == m]
        return range(ws[0], ws[-1] + 1) if ws else range(0)
