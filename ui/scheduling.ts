import { api, ApiError } from './admin.js'

/*
 * What each LLM server holds warm (CONTRACT 16): `../admin/scheduling` (relative, so it works under
 * any prefix) read with this tab's token every few seconds, and soon after the fleet feed says a
 * server's slots changed (a request came or went), at most once a second. The Servers table draws
 * it beside each server's loaded models. Without the admin token there is nothing to show.
 */

export interface ServerWarmth {
  id: string
  name: string
  models: string[]
  conversations: number
  requests: number
  hits: number
  hitRate: number | null
}

const REFRESH_MS = 5000
const SOON_MS = 1000

/** The last answer by assignment id; undefined while it cannot be read (no token, an error). */
let warmth: Map<string, ServerWarmth> | undefined
/** Why not, for the cells' titles. */
let unavailable = 'not read yet'
let changed: () => void = () => {}
let soon: number | undefined

export function warmthOf (assignmentId: string): ServerWarmth | undefined {
  return warmth?.get(assignmentId)
}

export function warmthMissing (): string {
  return unavailable
}

async function refresh (): Promise<void> {
  try {
    const answer = await api('GET', 'scheduling') as { servers: ServerWarmth[] }
    warmth = new Map(answer.servers.map((s) => [s.id, s]))
  } catch (err) {
    warmth = undefined
    unavailable = err instanceof ApiError && (err.status === 401 || err.status === 403) ? 'shown with the admin token' : 'could not be read'
  }
  changed()
}

/** The feed saw a server's slots change: read again soon (once for a burst of changes). */
export function refreshSoon (): void {
  if (soon !== undefined) return
  soon = window.setTimeout(() => { soon = undefined; void refresh() }, SOON_MS)
}

/** Start reading; `onChange` redraws what shows it. Call `refreshSoon` when the token changes too. */
export function startScheduling (onChange: () => void): void {
  changed = onChange
  void refresh()
  window.setInterval(() => { if (!document.hidden) void refresh() }, REFRESH_MS)
}
