import { diffSnapshots, type FleetSnapshot } from './fleet-snapshot.js'

/** One reader of the stream: takes whole server-sent-event frames. */
export interface FleetReader {
  write: (frame: string) => void
  /** The hub is closing (the gateway shuts down): finish the stream. */
  end: () => void
}

export interface FleetEventHubOptions {
  /** Reads the shared state (one lease-store status read and friends). */
  build: () => Promise<FleetSnapshot>
  /** How often the state is read while anyone listens. */
  intervalMs?: number
  /** The least time between two reads, however often `poke` is called (default 250 ms). */
  minGapMs?: number
  /** A comment frame this often keeps proxies from closing an idle stream. */
  heartbeatMs?: number
  onError?: (err: unknown) => void
}

export const frame = (event: string, data: unknown): string => `event: ${event}\ndata: ${JSON.stringify(data)}\n\n`

/**
 * One source of fleet events per gateway instance, however many pages are open: while anyone
 * listens it reads the state every `intervalMs` (sooner after `poke`, never twice within
 * `minGapMs`), diffs it with the last read and writes the same frame to every reader. A new
 * reader gets a whole snapshot first. Nobody listening: no reads at all.
 */
export class FleetEventHub {
  private readonly readers = new Set<FleetReader>()
  /** Readers that still need a whole snapshot (new ones, and everyone after an outage). */
  private readonly needSnapshot = new Set<FleetReader>()
  private current?: FleetSnapshot
  private timer?: NodeJS.Timeout
  private heartbeat?: NodeJS.Timeout
  private dueAt = Infinity
  private lastStart = -Infinity
  private building = false
  private failing = false
  private closed = false
  private readonly intervalMs: number
  private readonly minGapMs: number
  private readonly heartbeatMs: number
  /** Told after every read of the state (a metric counts them). */
  onBuild?: () => void

  constructor (private readonly opts: FleetEventHubOptions) {
    this.intervalMs = opts.intervalMs ?? 500
    this.minGapMs = opts.minGapMs ?? 250
    this.heartbeatMs = opts.heartbeatMs ?? 15_000
  }

  get size (): number {
    return this.readers.size
  }

  /** Adds a reader; it hears a snapshot as soon as one is read. Returns the way to leave. */
  subscribe (reader: FleetReader): () => void {
    if (this.closed) return () => {}
    this.readers.add(reader)
    this.needSnapshot.add(reader)
    if (this.heartbeat == null) {
      this.heartbeat = setInterval(() => { this.broadcast(':\n\n') }, this.heartbeatMs)
      this.heartbeat.unref()
    }
    this.schedule(0)
    return () => { this.unsubscribe(reader) }
  }

  private unsubscribe (reader: FleetReader): void {
    this.readers.delete(reader)
    this.needSnapshot.delete(reader)
    if (this.readers.size > 0) return
    clearTimeout(this.timer)
    clearInterval(this.heartbeat)
    this.timer = undefined
    this.heartbeat = undefined
    this.dueAt = Infinity
    // Whatever is read next time starts from scratch: changes meanwhile went unseen.
    this.current = undefined
  }

  /** Something changed (a lease here, a notice from another replica): read the state soon. */
  poke (): void {
    if (this.readers.size > 0) this.schedule(0)
  }

  private schedule (delayMs: number): void {
    if (this.closed || this.readers.size === 0) return
    const at = Math.max(performance.now() + delayMs, this.lastStart + this.minGapMs)
    if (this.building) {
      // Read again right after the read under way, which may have started before the change.
      this.dueAt = Math.min(this.dueAt, at)
      return
    }
    if (at >= this.dueAt && this.timer != null) return
    clearTimeout(this.timer)
    this.dueAt = at
    this.timer = setTimeout(() => { void this.tick() }, Math.max(0, at - performance.now()))
    this.timer.unref()
  }

  private async tick (): Promise<void> {
    this.timer = undefined
    this.dueAt = Infinity
    if (this.closed || this.readers.size === 0) return
    this.building = true
    this.lastStart = performance.now()
    try {
      const next = await this.opts.build()
      this.onBuild?.()
      this.publish(next)
    } catch (err) {
      this.opts.onError?.(err)
      if (!this.failing) this.broadcast(frame('unavailable', { error: 'fleet state unavailable' }))
      this.failing = true
      this.current = undefined
      for (const r of this.readers) this.needSnapshot.add(r)
    } finally {
      this.building = false
    }
    const pending = this.dueAt
    this.dueAt = Infinity
    this.schedule(pending === Infinity ? this.intervalMs : Math.max(0, pending - performance.now()))
  }

  private publish (next: FleetSnapshot): void {
    const prev = this.current
    this.current = next
    this.failing = false
    const change = prev == null ? null : diffSnapshots(prev, next)
    const changeFrame = change == null ? undefined : frame('change', change)
    let snapshotFrame: string | undefined
    for (const reader of [...this.readers]) {
      if (this.needSnapshot.has(reader) || prev == null) {
        this.needSnapshot.delete(reader)
        snapshotFrame ??= frame('snapshot', next)
        reader.write(snapshotFrame)
      } else if (changeFrame != null) {
        reader.write(changeFrame)
      }
    }
  }

  private broadcast (text: string): void {
    for (const reader of [...this.readers]) reader.write(text)
  }

  close (): void {
    this.closed = true
    clearTimeout(this.timer)
    clearInterval(this.heartbeat)
    for (const reader of this.readers) reader.end()
    this.readers.clear()
    this.needSnapshot.clear()
  }
}

/** What an event-stream reader writes to: an HTTP response, or any Node writable. */
export interface FrameSink {
  write: (chunk: string) => boolean
  readonly writableLength: number
  destroy: () => void
  end: () => void
}

/**
 * A reader that writes frames to a socket and is cut off, not buffered for ever, when it does not
 * keep up: once a write is refused (the stream's buffer is full) and more than `maxBufferedBytes`
 * wait unsent, the connection is destroyed. A browser's EventSource then reconnects by itself.
 */
export class StreamReader implements FleetReader {
  dropped = false

  constructor (private readonly sink: FrameSink, private readonly maxBufferedBytes: number, private readonly onDrop: () => void) {}

  write (text: string): void {
    if (this.dropped) return
    if (this.sink.write(text)) return
    if (this.sink.writableLength <= this.maxBufferedBytes) return
    this.dropped = true
    this.sink.destroy()
    this.onDrop()
  }

  end (): void {
    if (!this.dropped) this.sink.end()
  }
}
