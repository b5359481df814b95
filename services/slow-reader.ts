import type { Writable } from 'node:stream'

/**
 * Bounds how long a client may hold a streamed answer back. An idle timeout only catches a client
 * that reads nothing at all; one that reads a few bytes now and then is never idle, yet keeps the
 * upstream (and its lease) paused for ever. This adds up the time the response's writer spends
 * blocked (its buffer full, waiting for 'drain') and destroys the response once that passes
 * `limitMs` over the whole answer. A client that keeps up with the stream is blocked for moments
 * at most; one on a slow link downloading a large answer gets `limitMs` of waiting in all.
 */
export function limitSlowReader (res: Writable, limitMs: number): void {
  const stepMs = Math.max(10, Math.min(1000, Math.floor(limitMs / 10)))
  let blockedMs = 0
  let last = performance.now()
  const timer = setInterval(() => {
    const now = performance.now()
    if (res.writableNeedDrain) blockedMs += now - last
    last = now
    if (blockedMs > limitMs) {
      clearInterval(timer)
      res.destroy()
    }
  }, stepMs)
  timer.unref()
  res.once('close', () => clearInterval(timer))
}
