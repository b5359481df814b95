import { write, writeSync } from 'node:fs'

/** How often buffered log lines are written out at the latest: what a SIGKILL can lose. */
export const LOG_FLUSH_MS = 50
/** Lines are written once this many characters have gathered (or at the next flush). */
const BATCH_CHARS = 8 * 1024
/** Lines gathered while the output does not take them (a full pipe nobody reads): past this, new ones are dropped. */
const MAX_BUFFERED_CHARS = 16 * 1024 * 1024
/** A pipe that is full for now (EAGAIN): the batch is offered again this much later. */
const RETRY_MS = 10

/**
 * Log lines written to a file descriptor in batches, asynchronously: pino's `DestinationStream`.
 *
 * It does what pino's sonic-boom destination did here, for a third of the CPU per line: sonic-boom
 * measures the UTF-8 length of everything it has gathered on every line (a string that grows by
 * concatenation, flattened again each time), which cost more than building the line. Here lines
 * are kept as they come and joined and encoded once per batch. A short write goes on with the
 * rest, a full pipe (EAGAIN) is tried again, a closed one (EPIPE) drops the batch.
 */
export class BatchedLog {
  private lines: string[] = []
  private chars = 0
  /** the batch handed to an asynchronous write that has not reported back */
  private writing = false
  /** a batch waiting to be offered again (EAGAIN), not in a write now */
  private retry: Buffer | undefined
  /** lines dropped: the output took nothing for MAX_BUFFERED_CHARS */
  dropped = 0

  constructor (private readonly fd: number) {}

  write (line: string): void {
    if (this.chars >= MAX_BUFFERED_CHARS) {
      this.dropped++
      return
    }
    this.lines.push(line)
    this.chars += line.length
    if (!this.writing && this.chars >= BATCH_CHARS) this.flush()
  }

  /** Writes what has gathered, unless a write is under way (its end writes the rest). */
  flush (): void {
    if (this.writing || this.lines.length === 0) return
    this.send(Buffer.from(this.take()))
  }

  /** Writes everything now, synchronously (on exit); a write under way is left to finish. */
  flushSync (): void {
    const pending = this.retry
    this.retry = undefined
    const rest = Buffer.from(this.take())
    let buf = pending !== undefined ? Buffer.concat([pending, rest]) : rest
    while (buf.length > 0) {
      try {
        buf = buf.subarray(writeSync(this.fd, buf))
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') return
      }
    }
  }

  private take (): string {
    const text = this.lines.length === 1 ? this.lines[0] : this.lines.join('')
    this.lines = []
    this.chars = 0
    return text
  }

  private send (buf: Buffer): void {
    this.writing = true
    write(this.fd, buf, 0, buf.length, null, (err, written) => {
      this.writing = false
      if (err != null) {
        if (err.code !== 'EAGAIN') return // the output is gone: nothing to keep
        this.retry = buf
        setTimeout(() => {
          if (this.retry !== buf) return // written on exit meanwhile
          this.retry = undefined
          this.send(buf)
        }, RETRY_MS).unref()
        this.writing = true // nothing else goes out before this batch
        return
      }
      if (written < buf.length) return this.send(buf.subarray(written))
      if (this.chars >= BATCH_CHARS) this.flush()
    })
  }
}

/**
 * Where the standalone server writes its JSON log lines: stdout, asynchronously and in batches
 * (`BatchedLog`). A synchronous write per line cost a syscall per request on the hot path. Lines
 * are flushed every LOG_FLUSH_MS and, synchronously, on exit (SIGTERM, SIGINT, an uncaught error:
 * close-with-grace ends each with process.exit), so a clean or fatal exit loses none; a SIGKILL
 * loses at most the last LOG_FLUSH_MS of lines.
 */
export function asyncStdout (): BatchedLog {
  const destination = new BatchedLog(1)
  setInterval(() => { destination.flush() }, LOG_FLUSH_MS).unref()
  process.once('exit', () => { destination.flushSync() })
  return destination
}
