import { randomUUID } from 'node:crypto'
import { Redis } from 'ioredis'

export const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'

type Teardown = { teardown: (fn: () => unknown) => void }

/** A unique key prefix for one test, with every key under it removed afterwards. */
export function testPrefix (t: Teardown): string {
  const prefix = `maestro-test:${randomUUID().slice(0, 8)}:`
  t.teardown(async () => { await deleteKeys(prefix) })
  return prefix
}

export async function deleteKeys (prefix: string): Promise<void> {
  const client = new Redis(REDIS_URL, { lazyConnect: true, maxRetriesPerRequest: 1 })
  try {
    await client.connect()
    let cursor = '0'
    do {
      const [next, keys] = await client.scan(cursor, 'MATCH', prefix.replace(/[*?[\]\\]/g, '\\$&') + '*', 'COUNT', 500)
      cursor = next
      if (keys.length > 0) await client.del(...keys)
    } while (cursor !== '0')
  } finally {
    client.disconnect()
  }
}

/** Connections as the gateway makes them: commands fail fast while Redis is away. */
export async function redisClients (t: Teardown): Promise<{ client: Redis, subscriber: Redis }> {
  const options = { enableOfflineQueue: false, maxRetriesPerRequest: 0, lazyConnect: true }
  const client = new Redis(REDIS_URL, options)
  const subscriber = new Redis(REDIS_URL, { ...options, enableOfflineQueue: true })
  await client.connect()
  await subscriber.connect()
  t.teardown(() => { client.disconnect(); subscriber.disconnect() })
  return { client, subscriber }
}
