import { randomUUID } from 'node:crypto'
import { Cluster, Redis } from 'ioredis'
import { clusterKeyPrefix } from '../../services/config/config.js'
import { parseHostPortList, type HostPort } from '../../services/config/connection-strings.js'
import { redisConnections, type RedisConnection } from '../../services/config/redis-connections.js'

export const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
/**
 * When set (`host:port,...`), the helpers below give Redis Cluster connections and hash-tagged
 * prefixes instead: test/redis-cluster.test.ts runs the lease rule suite this way.
 */
export const TEST_CLUSTER_NODES = process.env.TEST_REDIS_CLUSTER_NODES

type Teardown = { teardown: (fn: () => unknown) => void }

const clusterNodes = (list: string): HostPort[] => parseHostPortList(list, 6379)

/** A unique key prefix for one test, with every key under it removed afterwards. */
export function testPrefix (t: Teardown): string {
  const plain = `maestro-test:${randomUUID().slice(0, 8)}:`
  const prefix = TEST_CLUSTER_NODES != null ? clusterKeyPrefix(plain) : plain
  t.teardown(async () => { await deleteKeys(prefix) })
  return prefix
}

async function deleteOn (client: Redis, prefix: string): Promise<void> {
  let cursor = '0'
  do {
    const [next, keys] = await client.scan(cursor, 'MATCH', prefix.replace(/[*?[\]\\{}]/g, '\\$&') + '*', 'COUNT', 500)
    cursor = next
    for (const key of keys) await client.del(key)
  } while (cursor !== '0')
}

export async function deleteKeys (prefix: string): Promise<void> {
  if (TEST_CLUSTER_NODES != null) {
    const client = new Cluster(clusterNodes(TEST_CLUSTER_NODES), { redisOptions: { maxRetriesPerRequest: 1 } })
    try {
      await new Promise((resolve) => client.once('ready', resolve))
      await Promise.all(client.nodes('master').map(async (node) => { await deleteOn(node, prefix) }))
    } finally {
      client.disconnect()
    }
    return
  }
  const client = new Redis(REDIS_URL, { lazyConnect: true, maxRetriesPerRequest: 1 })
  try {
    await client.connect()
    await deleteOn(client, prefix)
  } finally {
    client.disconnect()
  }
}

/** Connections as the gateway makes them: commands fail fast while Redis is away. */
export async function redisClients (t: Teardown): Promise<{ client: RedisConnection, subscriber: RedisConnection }> {
  if (TEST_CLUSTER_NODES != null) {
    const nodes = clusterNodes(TEST_CLUSTER_NODES)
    const { client, subscriber } = redisConnections({ kind: 'cluster', nodes, auth: { tls: false, sentinelTls: false } })
    t.teardown(() => { client.disconnect(); subscriber.disconnect() })
    await Promise.all([client, subscriber].map(async (c) => await new Promise((resolve) => c.once('ready', resolve))))
    return { client, subscriber }
  }
  const options = { enableOfflineQueue: false, maxRetriesPerRequest: 0, lazyConnect: true }
  const client = new Redis(REDIS_URL, options)
  const subscriber = new Redis(REDIS_URL, { ...options, enableOfflineQueue: true })
  await client.connect()
  await subscriber.connect()
  t.teardown(() => { client.disconnect(); subscriber.disconnect() })
  return { client, subscriber }
}
