"Everything a user needs: `from igdmfast.all import *`."
from .core import *
from .attacks import *
from .losses import *
from .methods import *
from .models import *
from .data import *
from .callback.adversarial import *
from .learner import *
from .callback.checkpoint import *
from .callback.averaging import *
from .evaluate import *
from .alignment import *
from .plots import *
from .report import *
from .distributed import *
from .stats import *
from .export import *
