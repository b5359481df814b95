import { randomUUID } from 'node:crypto'

/**
 * One client exchange, from its first byte to the close of its response. The response's 'close'
 * event is the one signal that fires however an exchange ends (completed, client gone, upstream
 * died, timed out), so leases hang their release on it.
 */
export class Exchange {
  private readonly controller = new AbortController()
  private readonly cleanups: Array<() => void> = []
  closed = false

  constructor (readonly requestId: string) {}

  /** Aborts when the exchange ends, for whatever reason. */
  get signal (): AbortSignal {
    return this.controller.signal
  }

  /** Run `fn` once the exchange has ended (at once if it already has). */
  onClose (fn: () => void): void {
    if (this.closed) fn()
    else this.cleanups.push(fn)
  }

  close (): void {
    if (this.closed) return
    this.closed = true
    this.controller.abort()
    for (const fn of this.cleanups.splice(0)) fn()
  }
}

const REQUEST_ID = /^[A-Za-z0-9._:@=+/-]{1,128}$/

/** The client's `x-request-id` when it is a sane token, else a new one. */
export function requestIdFrom (header: string | string[] | undefined): string {
  return typeof header === 'string' && REQUEST_ID.test(header) ? header : randomUUID()
}
