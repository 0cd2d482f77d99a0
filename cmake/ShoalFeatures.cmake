# Finds shoal's dependencies (all from Debian's packages; CUDA/NCCL from /usr/local/cuda) and
# prints what was found and what was not, so a build log says which features a binary has.

set(_shoal_found "")
set(_shoal_missing "")
macro(shoal_report name ok detail)
  if(${ok})
    message(STATUS "shoal: ${name}: found ${detail}")
  else()
    message(STATUS "shoal: ${name}: NOT found ${detail}")
  endif()
endmacro()

find_package(absl CONFIG REQUIRED)
shoal_report("abseil" absl_FOUND "")
find_package(Torch REQUIRED)
shoal_report("LibTorch" Torch_FOUND "${Torch_VERSION} (${TORCH_INSTALL_PREFIX})")
find_package(Protobuf REQUIRED)
shoal_report("Protocol Buffers" Protobuf_FOUND "${Protobuf_VERSION}")

# Optional features, each ON where its dependencies are found (and not switched off), so that a
# machine without them (the GPU machines have only LibTorch and CUDA) still builds the core:
# common/, memory/, comm/ (Gloo, NCCL), parallel/, scheduler/'s solver and simulator, runtime/,
# and the train, run, bench, profile, prepare-data and env subcommands.
#   SHOAL_COORDINATOR  the coordinator service, its HTTP status and dashboard, swarm mode, and
#                      the workers' link to it (`shoal coordinator`, `worker`, `status`,
#                      `train --coordinator`): gRPC, prometheus-cpp, cpp-httplib.
#   SHOAL_MPI          the MPI backend (parallel.backend = "mpi"): an MPI with C++ bindings.
option(SHOAL_COORDINATOR
       "Build the coordinator and swarm mode where gRPC, prometheus-cpp and cpp-httplib are found"
       ON)
option(SHOAL_MPI "Build the MPI backend where MPI is found" ON)
find_package(PkgConfig REQUIRED)
set(SHOAL_HAVE_COORDINATOR OFF)
if(SHOAL_COORDINATOR)
  find_package(gRPC CONFIG QUIET)
  shoal_report("gRPC" gRPC_FOUND "${gRPC_VERSION}")
  # The coordinator's HTTP port: Prometheus text from prometheus-cpp's registry and serializer,
  # served with cpp-httplib (a compiled library in Debian, found through pkg-config).
  find_package(prometheus-cpp CONFIG QUIET)
  shoal_report("prometheus-cpp" prometheus-cpp_FOUND "${prometheus-cpp_VERSION}")
  pkg_check_modules(HTTPLIB QUIET IMPORTED_TARGET cpp-httplib)
  shoal_report("cpp-httplib" HTTPLIB_FOUND "${HTTPLIB_VERSION}")
  if(gRPC_FOUND AND prometheus-cpp_FOUND AND HTTPLIB_FOUND)
    set(SHOAL_HAVE_COORDINATOR ON)
  endif()
  shoal_report("feature SHOAL_COORDINATOR" SHOAL_HAVE_COORDINATOR
               "(needs gRPC, prometheus-cpp and cpp-httplib)")
else()
  message(STATUS "shoal: feature SHOAL_COORDINATOR: off (-DSHOAL_COORDINATOR=OFF)")
endif()
set(SHOAL_HAVE_MPI OFF)
if(SHOAL_MPI)
  find_package(MPI COMPONENTS CXX QUIET)
  shoal_report("MPI" MPI_CXX_FOUND "${MPI_CXX_VERSION}")
  if(MPI_CXX_FOUND)
    set(SHOAL_HAVE_MPI ON)
  endif()
else()
  message(STATUS "shoal: feature SHOAL_MPI: off (-DSHOAL_MPI=OFF)")
endif()
find_package(tomlplusplus CONFIG REQUIRED)
shoal_report("toml++" tomlplusplus_FOUND "")
find_package(nlohmann_json CONFIG REQUIRED)
shoal_report("nlohmann_json" nlohmann_json_FOUND "")
find_package(CLI11 CONFIG REQUIRED)
shoal_report("CLI11" CLI11_FOUND "")
find_package(OpenSSL REQUIRED COMPONENTS Crypto)
shoal_report("OpenSSL" OpenSSL_FOUND "${OPENSSL_VERSION}")
find_package(GTest CONFIG QUIET)
if(NOT GTest_FOUND)
  find_package(GTest QUIET)
endif()
shoal_report("GoogleTest" GTest_FOUND "")
find_path(GLOO_INCLUDE_DIR gloo/context.h)
if(GLOO_INCLUDE_DIR)
  set(SHOAL_HAVE_GLOO ON)
endif()
shoal_report("Gloo headers" SHOAL_HAVE_GLOO "${GLOO_INCLUDE_DIR}")

# CUDA and NCCL: only from the toolkit under /usr/local/cuda; compiled in where present.
set(SHOAL_CUDA_ROOT "/usr/local/cuda" CACHE PATH "CUDA toolkit root")
if(EXISTS "${SHOAL_CUDA_ROOT}/bin/nvcc")
  set(SHOAL_HAVE_CUDA ON)
endif()
shoal_report("CUDA toolkit" SHOAL_HAVE_CUDA "(${SHOAL_CUDA_ROOT}; the CPU build of LibTorch is used either way)")
# CUDA C++ (nvcc) for memory/'s device tier: kernels are compiled where the toolkit works with the
# host compiler; SHOAL_WITH_CUDA=OFF skips them. The default architecture is Hopper (sm_90, the
# GPU machines this project is checked on); set CMAKE_CUDA_ARCHITECTURES for others.
option(SHOAL_WITH_CUDA "Build the CUDA device tier where the toolkit is found" ON)
set(SHOAL_HAVE_CUDA_LANGUAGE OFF)
if(SHOAL_HAVE_CUDA AND SHOAL_WITH_CUDA)
  if(NOT DEFINED ENV{CUDACXX} AND NOT CMAKE_CUDA_COMPILER)
    set(ENV{CUDACXX} "${SHOAL_CUDA_ROOT}/bin/nvcc")
  endif()
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  if(NOT CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 90)
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    set(CUDAToolkit_ROOT ${SHOAL_CUDA_ROOT})
    find_package(CUDAToolkit QUIET)
    if(CUDAToolkit_FOUND)
      set(SHOAL_HAVE_CUDA_LANGUAGE ON)
    endif()
  endif()
endif()
shoal_report("CUDA device tier" SHOAL_HAVE_CUDA_LANGUAGE "(nvcc ${CMAKE_CUDA_COMPILER_VERSION}, sm ${CMAKE_CUDA_ARCHITECTURES})")
find_library(NCCL_LIBRARY nccl HINTS ${SHOAL_CUDA_ROOT}/lib64 ${SHOAL_CUDA_ROOT}/lib)
if(NCCL_LIBRARY)
  set(SHOAL_HAVE_NCCL ON)
endif()
shoal_report("NCCL" SHOAL_HAVE_NCCL "${NCCL_LIBRARY}")

# Which BLAS LibTorch will call: Debian's LibTorch links libblas.so.3, which the alternatives
# system points at the reference BLAS unless an OpenBLAS variant is installed. The reference
# BLAS makes every matmul ~20x slower, so say so loudly.
find_file(SHOAL_LIBBLAS libblas.so.3 PATHS /usr/lib/${CMAKE_LIBRARY_ARCHITECTURE} /usr/lib NO_DEFAULT_PATH)
if(SHOAL_LIBBLAS)
  get_filename_component(_blas_real "${SHOAL_LIBBLAS}" REALPATH)
  if(_blas_real MATCHES "openblas")
    message(STATUS "shoal: BLAS used by LibTorch: OpenBLAS (${_blas_real})")
  else()
    message(WARNING
      "\n**************************************************************\n"
      "shoal: LibTorch will use the REFERENCE BLAS (${_blas_real}).\n"
      "Matrix multiplies will be about 20x slower. Install OpenBLAS:\n"
      "    apt-get install libopenblas0-pthread\n"
      "**************************************************************")
  endif()
else()
  message(WARNING "shoal: could not find libblas.so.3; cannot tell which BLAS LibTorch uses")
endif()

# LibTorch's exported flags carry -D_GLIBCXX_USE_CXX11_ABI and the c10d defines.
set(SHOAL_TORCH_FLAGS ${TORCH_CXX_FLAGS})
