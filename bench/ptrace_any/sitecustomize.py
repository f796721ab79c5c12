"""Put on a process's PYTHONPATH (bench/gpu_serving.py --py-spy does, for the service it starts), this lets any
process of the same user read this one, and the processes it spawns, with ptrace: under Yama's ptrace_scope 1 only
an ancestor may, and py-spy, started by the bench beside the service, is not one. Linux only; elsewhere nothing."""

import ctypes
import sys

if sys.platform == "linux":
    PR_SET_PTRACER, PR_SET_PTRACER_ANY = 0x59616D61, -1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PTRACER, ctypes.c_ulong(PR_SET_PTRACER_ANY), 0, 0, 0)
    except (OSError, AttributeError):
        pass
