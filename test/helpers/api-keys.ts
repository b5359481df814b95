import { createHash } from 'node:crypto'
import { Redis } from 'ioredis'
import type { Query } from '../../services/fleet/inventory.js'
import { REDIS_URL } from './redis.js'

export const sha256Hex = (secret: string): string => createHash('sha256').update(secret, 'utf8').digest('hex')

export interface KeyRow {
  priority?: 'high' | 'normal' | 'low'
  maxConcurrent?: number
  maxQueued?: number
  rpm?: number
  /** written as given: a JSON array or a text list */
  models?: string
}

/** A key written straight into `api_keys`, as an operator (or the admin API) would: only its SHA-256. */
export async function insertKey (query: Query, name: string, secret: string, row: KeyRow = {}): Promise<void> {
  await query('INSERT INTO api_keys (name, secret_sha256, priority, max_concurrent, max_queued, rpm, models) VALUES (?, ?, ?, ?, ?, ?, ?)',
    [name, sha256Hex(secret), row.priority ?? 'normal', row.maxConcurrent ?? null, row.maxQueued ?? null, row.rpm ?? null, row.models ?? null])
}

/** A key client's tokens in Redis right now: requests in flight (active) and waiting. */
export async function clientTokens (prefix: string, clientId: string): Promise<{ active: number, waiting: number }> {
  const client = new Redis(REDIS_URL)
  try {
    const base = `${prefix}client:${Buffer.from(clientId, 'utf8').toString('hex')}:`
    const now = Date.now()
    const [active, waiting] = await Promise.all([
      client.zcount(base + 'active', now, '+inf'),
      client.zcount(base + 'waiting', now, '+inf')
    ])
    return { active, waiting }
  } finally {
    client.disconnect()
  }
}

/** Polls until `check` holds or `ms` passed; answers whether it held. */
export async function eventually (check: () => Promise<boolean>, ms = 2000): Promise<boolean> {
  const deadline = performance.now() + ms
  for (;;) {
    if (await check()) return true
    if (performance.now() > deadline) return false
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}
