"Shared test settings: under pytest-xdist each worker (and every process it starts) uses one CPU thread."
import os

if os.environ.get('PYTEST_XDIST_WORKER'):
    # two workers with two OpenMP threads each would oversubscribe a 2-core machine and spin
    os.environ['OMP_NUM_THREADS'] = os.environ['MKL_NUM_THREADS'] = '1'
    import torch
    torch.set_num_threads(1)


# The longest files first, so that with `pytest -n 2 --dist loadfile` they start at once instead of ending alone.
SLOW_FIRST = ('test_main_job.py', 'test_cli.py', 'test_evaluate_protocol.py', 'test_docs.py', 'test_paper_protocol.py')


def pytest_collection_modifyitems(session, config, items):
    rank = lambda item: SLOW_FIRST.index(item.path.name) if item.path.name in SLOW_FIRST else len(SLOW_FIRST)
    items.sort(key=rank)   # stable: the order inside each file is kept
