import pino from 'pino'

/** How often buffered log lines are written out at the latest: what a SIGKILL can lose. */
export const LOG_FLUSH_MS = 50

/**
 * Where the standalone server writes its JSON log lines: stdout, asynchronously and in batches
 * (pino's sonic-boom destination). A synchronous write per line cost a syscall per request on
 * the hot path. Lines are flushed every LOG_FLUSH_MS and, synchronously, on exit (SIGTERM,
 * SIGINT, an uncaught error: close-with-grace ends each with process.exit), so a clean or fatal
 * exit loses none; a SIGKILL loses at most the last LOG_FLUSH_MS of lines.
 */
export function asyncStdout (): pino.DestinationStream {
  const destination = pino.destination({ dest: 1, sync: false, minLength: 8 * 1024 })
  const flush = (): void => {
    try { destination.flush() } catch {} // not ready yet, or stdout closed: nothing to keep
  }
  setInterval(flush, LOG_FLUSH_MS).unref()
  process.once('exit', () => {
    try { destination.flushSync() } catch {}
  })
  return destination
}
