#!/usr/bin/env bash
# Print the machine a test run happens on, so a failure in CI says where it happened: CPU model,
# cores, the instruction-set flags that decide which dtype is fast (measured at start, never
# assumed: see engine/tuning.py), memory and the OS.
set -u
model=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2-)
has() { case " $flags " in *" $1 "*) echo yes ;; *) echo no ;; esac; }
echo "machine: ${model:-unknown CPU}; $(nproc) cores available (of $(getconf _NPROCESSORS_ONLN))"
echo "machine: avx2=$(has avx2) avx512f=$(has avx512f) avx512_bf16=$(has avx512_bf16)" \
  "avx512_fp16=$(has avx512_fp16) avx512_vnni=$(has avx512_vnni) amx_bf16=$(has amx_bf16)" \
  "amx_tile=$(has amx_tile)"
echo "machine: $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo);" \
  "$(uname -sr); load $(cut -d' ' -f1-3 /proc/loadavg)"
