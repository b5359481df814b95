/**
 * The bytes of request bodies the gateway holds at once (BODY_MEMORY_LIMIT). `QUEUE_MAX` bounds
 * how many requests wait, not how much they hold: a dozen 40 MB bodies waiting for one busy GPU
 * would take a gigabyte. Each request holds its body's bytes from the moment they are announced
 * (Content-Length) or arrive (chunked) until the request ends, however it ends.
 */
export class BodyBudget {
  private used = 0

  constructor (readonly limit: number) {}

  /** Bytes held right now. */
  get held (): number {
    return this.used
  }

  /** A new request's share, empty until it adds bytes. */
  hold (): BodyHold {
    return new BodyHold(this)
  }

  /** @internal */
  take (bytes: number): boolean {
    if (this.used + bytes > this.limit) return false
    this.used += bytes
    return true
  }

  /** @internal */
  give (bytes: number): void {
    this.used -= bytes
  }
}

/** One request's bytes in the budget; `release()` gives them all back, once. */
export class BodyHold {
  private bytes = 0
  private released = false

  constructor (private readonly budget: BodyBudget) {}

  /** Adds bytes to the hold; false (and nothing added) when the budget has no room for them. */
  add (bytes: number): boolean {
    if (this.released) return false
    if (!this.budget.take(bytes)) return false
    this.bytes += bytes
    return true
  }

  release (): void {
    if (this.released) return
    this.released = true
    this.budget.give(this.bytes)
    this.bytes = 0
  }
}
