// SHOAL_SIMD_CLONES: compile a hot loop three times (AVX-512, AVX2+FMA, baseline x86-64) and let
// the loader pick the widest the CPU has (GCC target_clones + ifunc). One binary then runs on every
// host of a mixed cluster and still uses wide vectors where they exist. Put it on a plain function
// holding the loop (not on a lambda), and mark the loop `#pragma omp simd` (the file needs
// -fopenmp-simd) so that float reductions vectorise too.
#ifndef SHOAL_COMMON_SIMD_H_
#define SHOAL_COMMON_SIMD_H_

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SHOAL_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define SHOAL_SIMD_CLONES
#endif

#endif  // SHOAL_COMMON_SIMD_H_
