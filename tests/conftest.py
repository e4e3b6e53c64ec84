# retina_d2 must be imported before anything from Detectron2: it bridges Detectron2 0.6 to
# today's NumPy/Pillow and to a missing detectron2._C (see retina_d2/compat.py).
import retina_d2  # noqa: F401


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_datasets(tmp_path_factory):
    """A datasets root (for RETINA_D2_DATASETS) holding the synthetic set, 6 photographs of 192 px:
    the tests that run tools/train_net.py on the instant configs share one conversion."""
    from retina_d2.data.converters import ConvertOptions, synthetic

    root = tmp_path_factory.mktemp("datasets")
    synthetic.convert(None, root / "synthetic", ConvertOptions(progress=False), count=6, size=192)
    return root


def _handlers():
    import logging

    loggers = [logging.getLogger()] + [
        log for log in logging.Logger.manager.loggerDict.values()
        if isinstance(log, logging.Logger)
    ]
    return {(log, h) for log in loggers for h in log.handlers}


def _remove_handlers_added_since(before):
    from detectron2.utils.logger import setup_logger

    for log, handler in _handlers() - before:
        if type(handler).__module__.startswith("_pytest"):
            continue  # pytest's own capture handlers: pytest removes them
        log.removeHandler(handler)
        handler.close()
    setup_logger.cache_clear()


@pytest.fixture(autouse=True)
def _loggers_left_as_found():
    """Remove the console and file handlers a test's tool run added (Detectron2's setup_logger,
    logging.basicConfig). They hold the stream pytest captured for that test, which is closed
    afterwards: a later test's log lines would print '--- Logging error ---' tracebacks into the
    stderr it checks. A user's process runs one tool and never meets this."""
    before = _handlers()
    yield
    _remove_handlers_added_since(before)


@pytest.fixture(scope="module", autouse=True)
def _module_loggers_left_as_found():
    """The same for what a module-scoped fixture's in-process training added (autouse, so set up
    before the module's fixtures and torn down after them): without it those handlers would
    outlive the module, as the per-test cleanup counts them as already there."""
    before = _handlers()
    yield
    _remove_handlers_added_since(before)
