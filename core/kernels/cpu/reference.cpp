#include "core/kernels/cpu/kernels.h"
