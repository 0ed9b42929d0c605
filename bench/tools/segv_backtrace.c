/* A crash reporter for one diagnostic run (bench/device_check.sh, phase cuda-errors): LD_PRELOAD it and a
 * SIGSEGV / SIGABRT / SIGBUS prints the native stack (execinfo's backtrace_symbols_fd: library(symbol+offset),
 * demangle with c++filt) to stderr, then dies of the same signal. Python's faulthandler only prints the Python
 * frames; the machine that crashes has no gdb.
 *   gcc -shared -fPIC -O1 -o segv_backtrace.so bench/tools/segv_backtrace.c
 *   LD_PRELOAD=$PWD/segv_backtrace.so python3 -c '...'   (without -X faulthandler: it takes the signal first) */
#include <execinfo.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

static void report(int sig) {
  void* frames[128];
  const char head[] = "\n== segv_backtrace: native stack at the signal ==\n";
  write(2, head, sizeof head - 1);
  int n = backtrace(frames, 128);
  backtrace_symbols_fd(frames, n, 2);
  signal(sig, SIG_DFL);
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = report;
  sa.sa_flags = SA_RESETHAND | SA_NODEFER;
  sigaction(SIGSEGV, &sa, 0);
  sigaction(SIGBUS, &sa, 0);
  sigaction(SIGABRT, &sa, 0);
}
