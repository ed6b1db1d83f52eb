"""How long a test waits for something that must happen before it calls it a failure.

Every wait in the suite is for an event (a reply, an edit, a ledger row, a process exit) and ends
as soon as it comes, so a ceiling costs nothing when the code works: it only bounds how long a
broken run takes to say so. They are generous on purpose: the suite must pass on a cold 2-core
machine that is also busy with something else. `FLUXBOT_TEST_WAIT_SCALE` multiplies all of them
(e.g. 3 on a very slow box).
"""

from __future__ import annotations

import os

SCALE = float(os.environ.get("FLUXBOT_TEST_WAIT_SCALE", "1"))

WAIT = 60.0 * SCALE
"""An event that follows from what the test just did: a reply, an edit, a queued or painted job."""

START = 180.0 * SCALE
"""A bot in a process of its own to come up: import torch and DiffSynth, load the tiny model, connect."""

COMPILE = 600.0 * SCALE
"""A first torch.compile of the tiny model with an empty Inductor cache on a busy 2-core machine."""
