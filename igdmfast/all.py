"Everything a user needs: `from igdmfast.all import *`."
from .core import *
from .attacks import *
from .models import *
from .data import *
