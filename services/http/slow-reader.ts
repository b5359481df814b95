import type { Writable } from 'node:stream'

/**
 * Bounds how long a client may hold a streamed answer back. An idle timeout only catches a client
 * that reads nothing at all; one that reads a few bytes now and then is never idle, yet keeps the
 * upstream (and its lease) paused for ever. This adds up the time each response's writer spends
 * blocked (its buffer full, waiting for 'drain') and destroys the response once that passes
 * `limitMs` over the whole answer. A client that keeps up with the stream is blocked for moments
 * at most; one on a slow link downloading a large answer gets `limitMs` of waiting in all.
 *
 * One timer looks at every watched response (a timer per response cost a share of each request),
 * and runs only while there is one.
 */
export class SlowReaderLimit {
  private readonly watched = new Map<Writable, { blockedMs: number, last: number }>()
  private readonly stepMs: number
  private timer?: NodeJS.Timeout

  constructor (private readonly limitMs: number) {
    this.stepMs = Math.max(10, Math.min(1000, Math.floor(limitMs / 10)))
  }

  /** Watch `res` until it closes. */
  watch (res: Writable): void {
    this.watched.set(res, { blockedMs: 0, last: performance.now() })
    res.once('close', () => { this.watched.delete(res) })
    if (this.timer == null) {
      this.timer = setInterval(() => this.look(), this.stepMs)
      this.timer.unref()
    }
  }

  private look (): void {
    const now = performance.now()
    for (const [res, w] of this.watched) {
      if (res.writableNeedDrain) w.blockedMs += now - w.last
      w.last = now
      if (w.blockedMs > this.limitMs) {
        this.watched.delete(res)
        res.destroy()
      }
    }
    if (this.watched.size === 0) {
      clearInterval(this.timer)
      this.timer = undefined
    }
  }
}
