// One macro per return-code family: CUDA runtime and cuBLAS. (NCCL's lives in comm/nccl.)
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "core/error.h"

#define MOE_CUDA_CHECK(expr)                                                                  \
  do {                                                                                        \
    cudaError_t moe_cuda_err_ = (expr);                                                       \
    MOE_CHECK(moe_cuda_err_ == cudaSuccess,                                                   \
              "CUDA error " << cudaGetErrorName(moe_cuda_err_) << " (" << cudaGetErrorString(moe_cuda_err_) \
                            << ") in " << #expr);                                             \
  } while (0)

#define MOE_CUBLAS_CHECK(expr)                                                                \
  do {                                                                                        \
    cublasStatus_t moe_cublas_st_ = (expr);                                                   \
    MOE_CHECK(moe_cublas_st_ == CUBLAS_STATUS_SUCCESS,                                        \
              "cuBLAS error " << cublasGetStatusString(moe_cublas_st_) << " in " << #expr);   \
  } while (0)
