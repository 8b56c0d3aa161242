// tests/cuda_host: the host build finds this instead of the CUDA toolkit header.
#pragma once
#include "cuda_host.h"
