// The client-limit stores (Redis with its Lua scripts, and memory) keep one set of rules: tokens
// with an expiry (never a bare counter), a sliding one-minute window, release exactly what was
// taken. Both pass the same suite, against a real Redis.
import t, { type Test } from 'tap'
import { MemoryClientLimitStore, RedisClientLimitStore, type ClientLimitStore } from '../services/clients/client-limits.js'
import { redisClients, testPrefix } from './helpers/redis.js'

type Make = (t: Test) => Promise<ClientLimitStore>

const stores: Array<[string, Make]> = [
  ['memory', async () => new MemoryClientLimitStore()],
  ['redis', async (t) => new RedisClientLimitStore((await redisClients(t)).client, testPrefix(t))]
]

const TTL = 30_000
const sleep = async (ms: number): Promise<void> => await new Promise((resolve) => setTimeout(resolve, ms))

for (const [kind, make] of stores) {
  t.test(`${kind}: maxConcurrent counts every request admitted and not ended, waiting or granted`, async (t) => {
    const store = await make(t)
    const limits = { maxConcurrent: 2 }
    t.same(await store.admit('c', 'a', limits, TTL), { admitted: true })
    t.same(await store.admit('c', 'b', limits, TTL), { admitted: true })
    await store.granted('c', 'a', TTL)
    const over = await store.admit('c', 'c', limits, TTL)
    t.equal(over.admitted, false)
    t.match(over, { limit: 'maxConcurrent' })
    t.same(await store.admit('other', 'x', limits, TTL), { admitted: true }, 'another client is not affected')
    await store.release('c', 'a')
    t.same(await store.admit('c', 'c', limits, TTL), { admitted: true }, 'a release frees one')
    await store.release('c', 'a')
    t.equal((await store.admit('c', 'd', limits, TTL)).admitted, false, 'a second release of the same token frees nothing more')
  })

  t.test(`${kind}: maxQueued counts only the waiting; a grant moves a request out of it`, async (t) => {
    const store = await make(t)
    const limits = { maxQueued: 1 }
    t.same(await store.admit('q', 'a', limits, TTL), { admitted: true })
    t.match(await store.admit('q', 'b', limits, TTL), { admitted: false, limit: 'maxQueued' })
    await store.granted('q', 'a', TTL)
    t.same(await store.admit('q', 'b', limits, TTL), { admitted: true }, 'the granted one no longer waits')
    await store.release('q', 'b')
    await store.granted('q', 'b', TTL)
    t.same(await store.admit('q', 'c', limits, TTL), { admitted: true }, 'a grant after the release does not bring the token back')
  })

  t.test(`${kind}: rpm is a sliding minute of admissions; a refusal says when the oldest leaves it`, async (t) => {
    const store = await make(t)
    const limits = { rpm: 3 }
    for (const token of ['a', 'b', 'c']) t.same(await store.admit('r', token, limits, TTL), { admitted: true })
    await store.release('r', 'a')
    const over = await store.admit('r', 'd', limits, TTL) as { admitted: false, limit: string, retryAfterMs: number }
    t.equal(over.admitted, false, 'released requests still count in their minute')
    t.equal(over.limit, 'rpm')
    t.ok(over.retryAfterMs > 59_000 && over.retryAfterMs <= 60_000, `retry after ${over.retryAfterMs} ms`)
    t.equal((await store.admit('r', 'e', { rpm: 2 }, TTL) as { retryAfterMs: number }).retryAfterMs <= 60_000, true,
      'a lowered limit waits for the entry that brings the count under it')
  })

  t.test(`${kind}: a token not renewed expires; a renewed one lives; a renewal never revives a released one`, async (t) => {
    const store = await make(t)
    const limits = { maxConcurrent: 1 }
    const ttl = 300
    t.same(await store.admit('e', 'a', limits, ttl), { admitted: true })
    await sleep(ttl + 100)
    t.same(await store.admit('e', 'b', limits, ttl), { admitted: true }, 'the silent token expired (its replica died)')
    for (let i = 0; i < 4; i++) {
      await sleep(ttl / 3)
      await store.renew('e', ['b'], ttl)
    }
    t.match(await store.admit('e', 'c', limits, ttl), { admitted: false }, 'renewed past its first ttl, it still counts')
    await store.granted('e', 'b', ttl)
    await store.renew('e', ['b'], ttl)
    t.match(await store.admit('e', 'c', limits, ttl), { admitted: false }, 'renewed as active too')
    await store.release('e', 'b')
    await store.renew('e', ['b'], ttl)
    t.same(await store.admit('e', 'c', limits, ttl), { admitted: true }, 'a renewal crossing the release did not revive it')
  })
}

t.test('redis: every key a script touches starts with the prefix, and an idle client leaves none behind', async (t) => {
  const { client } = await redisClients(t)
  const prefix = testPrefix(t)
  const store = new RedisClientLimitStore(client, prefix)
  await store.admit('key:a b*?', 't1', { maxConcurrent: 1, rpm: 5 }, 200)
  const keys = await client.keys('*' + Buffer.from('key:a b*?').toString('hex') + '*')
  t.ok(keys.length === 2 && keys.every((k) => k.startsWith(prefix + 'client:')), `keys under the prefix, the id in hex: ${keys.join(' ')}`)
  await store.release('key:a b*?', 't1')
  await sleep(300)
  t.same((await client.keys(prefix + 'client:*')).filter((k) => !k.endsWith(':window')), [], 'sets expire with their tokens')
})
