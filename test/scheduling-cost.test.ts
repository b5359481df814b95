// Scheduler v3's pure parts (CONTRACT 16): prompt fingerprints, the cost model and its learned
// rates, the affinity map in memory and in Redis (bounded, expiring), the plan a scheduler makes.
import t from 'tap'
import { Redis } from 'ioredis'
import { fingerprintOf, FIRST_HASHES, LAST_HASHES, PROMPT_CHUNK_CHARS } from '../services/scheduling/prefix-fingerprint.js'
import { DEFAULT_LOAD_MS, DEFAULT_PREFILL_MS_PER_TOKEN, LearnedRates, rank, waitBudgetMs } from '../services/scheduling/cost-model.js'
import { MemoryAffinityMap, RedisAffinityMap } from '../services/scheduling/affinity-map.js'
import { Scheduler } from '../services/scheduling/scheduler.js'
import type { Assignment } from '../services/fleet/inventory.js'
import { REDIS_URL, testPrefix } from './helpers/redis.js'

const msg = (role: string, content: string): { role: string, content: string } => ({ role, content })

t.test('fingerprints: a conversation\'s next turn shares the last turn\'s whole prefix; bare prompts by chunks; named sessions', async (t) => {
  const turn1 = [msg('system', 'You are terse.'), msg('user', 'What is the moon?')]
  const turn2 = [...turn1, msg('assistant', 'A rock.'), msg('user', 'How far is it?')]
  const f1 = fingerprintOf('/api/chat', { model: 'm', messages: turn1 })
  const f2 = fingerprintOf('/v1/chat/completions', { model: 'm', messages: turn2, max_tokens: 50 })
  t.ok(f1 !== undefined && f2 !== undefined)
  t.equal(f1?.hashes.length, 2)
  t.equal(f2?.hashes.length, 4)
  t.ok(f2?.hashes.includes(f1?.hashes[1] as string), 'turn 2 holds the hash of turn 1\'s whole prompt')
  t.equal(f2?.maxOutputTokens, 50)
  t.equal(f2?.held[1], f2?.tokens[2], 'a server that served turn 1 holds its answer too')
  t.equal(f2?.held[0], f2?.tokens[0])
  t.equal(f1?.promptTokens, Math.ceil(('You are terse.'.length + 'What is the moon?'.length) / 4), 'chars / 4')
  const other = fingerprintOf('/api/chat', { model: 'm', messages: [msg('system', 'You are terse.'), msg('user', 'What is the sun?')] })
  t.equal(other?.hashes[0], f1?.hashes[0], 'same system prompt: same first hash')
  t.not(other?.hashes[1], f1?.hashes[1], 'another question: another prefix')
  // the Anthropic API's `system`, the Responses API's `instructions`
  const a = fingerprintOf('/v1/messages', { model: 'm', system: 'be brief', messages: [msg('user', 'hi')], max_tokens: 10 })
  t.equal(a?.hashes.length, 2)
  const r = fingerprintOf('/v1/responses', { model: 'm', instructions: 'be brief', input: 'hi' })
  t.equal(r?.hashes.length, 2)

  // bare prompts: at every PROMPT_CHUNK_CHARS characters, so a longer prompt with the same start matches
  const long = 'x'.repeat(PROMPT_CHUNK_CHARS * 3)
  const g1 = fingerprintOf('/api/generate', { model: 'm', prompt: long })
  const g2 = fingerprintOf('/v1/completions', { model: 'm', prompt: long + ' and more' })
  t.equal(g1?.hashes.length, 3)
  t.same(g2?.hashes.slice(0, 3), g1?.hashes, 'the longer prompt shares every chunk of the shorter')
  t.not(fingerprintOf('/api/generate', { model: 'm', system: 's', prompt: long })?.hashes[0], g1?.hashes[0], 'a system prompt is part of the prefix')

  // bounded: the first FIRST_HASHES and the last LAST_HASHES prefixes
  const many = Array.from({ length: 40 }, (_, i) => msg(i % 2 === 0 ? 'user' : 'assistant', `message ${i}`))
  const fm = fingerprintOf('/api/chat', { model: 'm', messages: many })
  const fm2 = fingerprintOf('/api/chat', { model: 'm', messages: many.slice(0, 39) })
  t.equal(fm?.hashes.length, FIRST_HASHES + LAST_HASHES)
  t.ok(fm?.hashes.includes(fm2?.hashes[fm2.hashes.length - 1] as string), 'still holds the previous turn\'s whole prefix')
  t.ok((fm?.tokens ?? []).every((n, i, a) => i === 0 || n >= a[i - 1]), 'covered tokens grow with the prefix')

  // explicit keys win: prompt_cache_key, then user, then X-Session-Id
  const k1 = fingerprintOf('/v1/chat/completions', { model: 'm', messages: turn1, prompt_cache_key: 'conv-1', user: 'u' }, 'sess')
  const k2 = fingerprintOf('/v1/chat/completions', { model: 'm', messages: turn2, prompt_cache_key: 'conv-1' })
  t.same(k1?.hashes, k2?.hashes, 'one name, one fingerprint')
  t.equal(k1?.hashes.length, 1)
  t.same(fingerprintOf('/api/chat', { model: 'm', messages: turn1 }, 'sess')?.hashes, fingerprintOf('/api/chat', { model: 'm', messages: turn2 }, 'sess')?.hashes, 'X-Session-Id')
  t.not(fingerprintOf('/api/chat', { model: 'm', messages: turn1, user: 'u' }, 'sess')?.hashes[0], k1?.hashes[0], 'user when no prompt_cache_key')

  // no prompt: no fingerprint
  t.equal(fingerprintOf('/api/embed', { model: 'm', input: 'x' }), undefined)
  t.equal(fingerprintOf('/api/chat', { model: 'm', messages: [] }), undefined)
  t.equal(fingerprintOf('/api/chat', 'not an object'), undefined)
})

t.test('cost model: defaults, learning from final lines, the ranking and the wait budget', async (t) => {
  const rates = new LearnedRates()
  t.equal(rates.prefillMsPerToken('a'), DEFAULT_PREFILL_MS_PER_TOKEN)
  t.equal(rates.loadMs('a'), DEFAULT_LOAD_MS)
  t.equal(rates.learn('a', { promptTokens: 1000, cachedTokens: 200, promptEvalMs: 1600, loadMs: 3 }), false, 'a few ms of load_duration: resident')
  t.equal(rates.prefillMsPerToken('a'), 2, '1600 ms for 800 computed tokens')
  t.equal(rates.loadMs('a'), DEFAULT_LOAD_MS)
  t.equal(rates.learn('a', { promptTokens: 10, cachedTokens: 0, promptEvalMs: 500, loadMs: 4000 }), true, 'a load')
  t.equal(rates.prefillMsPerToken('a'), 2, 'too few computed tokens to learn a rate from')
  t.equal(rates.loadMs('a'), 4000)
  t.equal(rates.prefillMsPerToken('b'), 2, 'an assignment not seen yet: like those seen')
  t.equal(rates.loadMs('b'), 4000)

  // holder: 900 of 1000 tokens cached; warm: none cached; cold: a load too
  const views = [
    { assignmentId: 'cold', resident: false, cachedTokens: 0, waitMs: 0 },
    { assignmentId: 'warm', resident: true, cachedTokens: 0, waitMs: 0 },
    { assignmentId: 'holder', resident: true, cachedTokens: 900, waitMs: 0 }
  ]
  const flat = { prefillMsPerToken: () => 1, loadMs: () => 3000 }
  const ranked = rank(views, 1000, flat)
  t.same(ranked.map((e) => e.assignmentId), ['holder', 'warm', 'cold'])
  t.same(ranked.map((e) => e.ttftMs), [100, 1000, 4000])
  // wait for the holder only while that is expected to be sooner than the free alternative
  t.equal(waitBudgetMs({ ...ranked[0], waitMs: 200 }, ranked[1], 10_000), 900, 'margin: 1000 - 100')
  t.equal(waitBudgetMs({ ...ranked[0], waitMs: 950 }, ranked[1], 10_000), 0, 'its expected wait is past the margin: take the free one')
  t.equal(waitBudgetMs({ ...ranked[0], waitMs: 0 }, ranked[2], 2000), 2000, 'capped at AFFINITY_MAX_WAIT_MS')
  t.equal(waitBudgetMs(rank(views, 10, flat)[0], rank(views, 10, flat)[1], 10_000), 10, 'a short prompt: little to gain')
})

t.test('affinity map in memory: longest match, LRU bound, expiry', async (t) => {
  const map = new MemoryAffinityMap({ entries: 3, ttlMs: 60_000 })
  await map.remember('m', ['a', 'b'], [10, 20], 'x')
  await map.remember('m', ['b2'], [30], 'y')
  t.same(await map.lookup('m', ['a', 'b', 'c']), { assignmentId: 'x', tokens: 20, index: 1 }, 'the longest prefix known')
  t.same(await map.lookup('m', ['a', 'b2']), { assignmentId: 'y', tokens: 30, index: 1 })
  t.equal(await map.lookup('other', ['a']), undefined, 'per model')
  await map.remember('m', ['d'], [5], 'z')
  t.equal(await map.lookup('m', ['a']), undefined, 'past 3 entries the least recently written goes')
  t.ok(await map.lookup('m', ['b']))
  const realNow = Date.now
  Date.now = () => realNow() + 61_000
  t.teardown(() => { Date.now = realNow })
  t.equal(await map.lookup('m', ['b']), undefined, 'expired')
})

t.test('affinity map in Redis: shared, longest match, LRU bound trimmed on write, expiring keys', async (t) => {
  const client = new Redis(REDIS_URL)
  t.teardown(() => client.disconnect())
  const prefix = testPrefix(t)
  const one = new RedisAffinityMap(client, prefix, { entries: 4, ttlMs: 60_000 })
  const two = new RedisAffinityMap(client, prefix, { entries: 4, ttlMs: 60_000 })
  await one.remember('llama3.2', ['h1', 'h2', 'h3'], [10, 20, 30], 'a1')
  t.same(await two.lookup('llama3.2', ['h1', 'h2', 'h3', 'h4']), { assignmentId: 'a1', tokens: 30, index: 2 }, 'another replica reads it')
  t.equal(await two.lookup('qwen3', ['h1']), undefined, 'per model')
  await two.remember('llama3.2', ['h4', 'h5'], [40, 50], 'a2')
  const key = prefix + 'aff:' + Buffer.from('llama3.2').toString('hex')
  t.equal(await client.hlen(key), 4, 'trimmed to AFFINITY_ENTRIES')
  t.equal(await two.lookup('llama3.2', ['h1']), undefined, 'the oldest write went first')
  t.same(await one.lookup('llama3.2', ['h2', 'h5']), { assignmentId: 'a2', tokens: 50, index: 1 })
  const ttl = await client.pttl(key)
  t.ok(ttl > 0 && ttl <= 60_000, 'the map expires with its last write')
  // a model name is never a key separator or a glob
  await one.remember('a*:b', ['h'], [1], 'a1')
  t.ok(await client.exists(prefix + 'aff:' + Buffer.from('a*:b').toString('hex')))
})

t.test('the plan: holder first; a bounded wait for it only when the estimate says so', async (t) => {
  const asg = (id: string): Assignment => ({ id, name: id, model: 'm', modelKey: 'm', kind: 'llm', ip: '127.0.0.1', port: 1, url: 'http://127.0.0.1:1', host: '127.0.0.1:1', gpuIds: [id], weight: 1, computerName: 'c', capacity: 1 })
  const all = [asg('1'), asg('2'), asg('3')]
  const affinity = new MemoryAffinityMap({ entries: 100, ttlMs: 60_000 })
  const deps = {
    affinity,
    rates: new LearnedRates(),
    warmAmong: () => ['1', '2'],
    isLoaded: (a: Assignment) => a.id !== '3',
    known: () => true,
    maxWaitMs: 10_000
  }
  const scheduler = new Scheduler(deps)
  const prompt = fingerprintOf('/api/chat', { model: 'm', messages: [msg('user', 'y'.repeat(40_000))] })
  if (prompt === undefined) throw new Error('no fingerprint')
  const first = await scheduler.plan(all, 'm', prompt)
  t.equal(first.holder, undefined, 'no holder yet')
  t.equal(first.pinMs, 0, 'no holder, no load seen yet: no wait')
  deps.rates.learn('1', { loadMs: 3000 })
  t.equal((await scheduler.plan(all, 'm', prompt)).pinMs, 6000, 'no holder: wait for a server with the model resident as long as a load elsewhere costs (its own and the one its eviction causes)')
  await affinity.remember('m', prompt.hashes, prompt.tokens, '2')
  const plan = await scheduler.plan(all, 'm', prompt)
  t.same(plan.preferred, ['2', '1'], 'the holder first, then the warm one')
  t.equal(plan.holder, '2', 'the store is told which server holds the prefix')
  t.equal(plan.pinMs, 10_000, 'worth waiting for: 10000 tokens at 0.5 ms (the free warm server\'s whole prefill), twice (what its eviction there costs later)')
  t.equal(scheduler.route(plan, all[1], 'm'), 'affinity')
  t.equal(scheduler.route(plan, all[0], 'm'), 'warm')
  t.equal(scheduler.route(plan, all[2], 'm'), 'load')
  t.equal(scheduler.savedTokens(plan, all[1]), 10_000)
  t.equal((await new Scheduler({ ...deps, maxWaitMs: 1000 }).plan(all, 'm', prompt)).pinMs, 1000, 'never past AFFINITY_MAX_WAIT_MS')
  t.equal((await new Scheduler({ ...deps, maxWaitMs: 60_000 }).plan(all, 'm', prompt)).pinMs, 10_000, 'twice the margin')
  t.equal((await new Scheduler({ ...deps, maxWaitMs: 0 }).plan(all, 'm', prompt)).pinMs, 0, 'AFFINITY_MAX_WAIT_MS 0: never waits')
  const short = fingerprintOf('/api/chat', { model: 'm', messages: [msg('user', 'hi there')] })
  await affinity.remember('m', short?.hashes ?? [], short?.tokens ?? [], '2')
  const shortPlan = await scheduler.plan(all.slice(0, 2), 'm', short)
  t.equal(shortPlan.pinMs, 0, 'a short prompt never waits for its holder')
  t.equal(shortPlan.holder, '2', 'but late binding still gives it its holder first')
  t.same(shortPlan.preferred, ['2', '1'], 'and prefers it when free')
  t.equal(shortPlan.chose, true, 'a choice: its lease is remembered in the map')
  // one candidate: nothing to choose, so the map is not read (the holder '2' is not named) nor written
  const alone = await scheduler.plan([all[1]], 'm', short)
  t.same([alone.chose, alone.holder, alone.pinMs, alone.preferred], [false, undefined, 0, ['2']], 'a model on one server is not planned')
})
