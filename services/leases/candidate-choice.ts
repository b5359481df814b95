import type { Assignment } from '../fleet/inventory.js'
import { failureCode } from '../http/upstream-failure.js'

/** How long an assignment that refused a connection sits out before it is tried first again. */
export const COOLDOWN_MS = 5000

/** Assignments found unreachable lately, shared by every request of a gateway. */
export class Cooldowns {
  private readonly until = new Map<string, number>()

  constructor (private readonly ms = COOLDOWN_MS) {}

  get size (): number {
    return this.until.size
  }

  cooling (assignmentId: string, now: number): boolean {
    return (this.until.get(assignmentId) ?? 0) > now
  }

  sitOut (assignmentId: string, now: number): void {
    for (const [id, until] of this.until) if (until <= now) this.until.delete(id)
    this.until.set(assignmentId, now + this.ms)
  }
}

/**
 * One request's way through its model's candidates: the untried ones, those in cooldown only when
 * nothing else is left; those found unreachable are not tried again by this request.
 */
export class CandidateRound {
  private readonly tried = new Set<string>()
  private lastFailure = ''

  constructor (private readonly all: readonly Assignment[], private readonly cooldowns: Cooldowns, private readonly model: string) {}

  /** The candidates to lease among next (in preference order), or undefined when every one has failed. */
  next (now = Date.now()): readonly Assignment[] | undefined {
    // (the filters copy the list; most requests have tried nothing and nothing is cooling)
    const untried = this.tried.size === 0 ? this.all : this.all.filter((a) => !this.tried.has(a.id))
    if (untried.length === 0) return undefined
    const fresh = this.cooldowns.size === 0 ? untried : untried.filter((a) => !this.cooldowns.cooling(a.id, now))
    return fresh.length > 0 ? fresh : untried
  }

  /** The upstream was unreachable before it saw the request: sit it out, try the next. */
  unreachable (assignment: Assignment, error: unknown, now = Date.now()): void {
    this.tried.add(assignment.id)
    this.cooldowns.sitOut(assignment.id, now)
    this.lastFailure = ` (last: '${assignment.name}' ${failureCode(error)})`
  }

  exhausted (): string {
    return `no upstream for model '${this.model}' is reachable${this.lastFailure}`
  }
}
