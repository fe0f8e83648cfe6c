"""``afnio_pytest``: replayed offline tests for your own LM programs.

A pytest plugin shipped with afnio (``pip install 'afnio-local[pytest]'``; loaded
through the ``pytest11`` entry point, never list it in ``pytest_plugins``). Mark a test
and every LM HTTP request it makes (the openai SDK sync and async, langchain-openai,
afnio's clients, ``dspy.LM("openai/...")``) is recorded once and replayed offline::

    import pytest

    @pytest.mark.afnio_replay
    def test_my_chain():
        assert my_chain.invoke({"text": "It broke."}) == "negative"

* ``pytest --afnio-record=new`` records the tests that have no cassette, against the
  bundled simulator (``afnio.testing.Simulator``); ``--afnio-record=all`` re-records
  every selected test; add ``--afnio-real-provider`` to record against the provider in
  ``OPENAI_API_KEY``/``OPENAI_BASE_URL``.
* ``pytest`` replays: no network (any connection fails the test), a dummy key, the
  provider and tracing variables dropped. A request the cassette lacks fails the test
  with a report (the closest recorded request, a diff of the bodies, the command that
  re-records it), even when the code under test caught the error.
* Marker options: ``@pytest.mark.afnio_replay(ignore_fields=(), lm_hosts=(),
  allow_hosts=(), keep_env=())``. Fixtures: ``afnio_endpoint`` (a
  :class:`ReplayEndpoint`) and ``afnio_simulator``.

Cassettes live where pytest-recording puts them (``vcr_cassette_dir``); they never hold
a credential (headers but ``content-type`` are dropped, credential query parameters
too, credentials in JSON bodies masked, and a save that would still hold one is
refused). The guide is ``docs/offline-tests.md``.
"""

from afnio_pytest._types import DUMMY_KEY, SIMULATOR_RECORDING, ReplayEndpoint

__all__ = ["DUMMY_KEY", "SIMULATOR_RECORDING", "ReplayEndpoint"]
