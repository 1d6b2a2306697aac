__version__ = "0.1.0"

import warnings as _warnings
with _warnings.catch_warnings():
    # fastai.layers decorates functions with `torch.jit.script` at import, which torch 2.14 marks deprecated: a warning a
    # user can do nothing about. Importing it here, once, with that one warning filtered, keeps it out of every import
    # of igdmfast and out of the rendered docs, without changing the warning filters of the user's process.
    _warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)
    import fastai.layers  # noqa: F401
del _warnings
