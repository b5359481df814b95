// Scheduler v3 through the gateway (CONTRACT 16): real MariaDB, Redis and simulated Ollama servers
// with their cost model (prompt caches, prefill per uncached token). A conversation's turns sent
// through two replicas alternately return to the server that holds their prefix; a request waits
// for that server only while the estimate says so, and never past AFFINITY_MAX_WAIT_MS.
import t, { type Test } from 'tap'
import { Ollama } from 'ollama'
import { startFleet, type Gateway, type TestFleet } from './helpers/gateway.js'
import { scrape } from './helpers/prometheus.js'

type Msg = { role: string, content: string }
const MODEL = 'llama3.2'
const COST = { prefillMsPerToken: 0.02, decodeMsPerToken: 0.1, slots: 1, ramCacheEntries: 1, answerTokens: 20_000 }

/** Polls until `cond` holds. */
async function until (cond: () => boolean | Promise<boolean>, what: string): Promise<void> {
  const deadline = Date.now() + 20_000
  while (!await cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
}

async function fleetOf (t: Test, affinityEntries: number, extra: Record<string, unknown> = {}, cost = COST): Promise<{ fleet: TestFleet, replicas: Gateway[] }> {
  const fleet = await startFleet(t, {
    gpus: [1, 1],
    upstreams: [0, 1].map((g) => ({ model: MODEL, gpus: [g], simulator: { resident: [MODEL], cost } })),
    options: { UPSTREAM_POLL_MS: 100, AFFINITY_ENTRIES: affinityEntries, ...extra }
  })
  const replicas = [await fleet.replica(), await fleet.replica()]
  return { fleet, replicas }
}

/** An ollama client on a replica that records each answer's x-maestro-* headers. */
function client (gw: Gateway, seen: Array<Record<string, string>>): Ollama {
  return new Ollama({
    host: gw.url,
    fetch: async (input: string | URL | Request, init?: RequestInit) => {
      const res = await fetch(input, init)
      seen.push({ assignment: res.headers.get('x-maestro-assignment') ?? '', route: res.headers.get('x-maestro-route') ?? '' })
      return res
    }
  })
}

const chats = (fleet: TestFleet): number => fleet.upstreams.reduce((n, s) => n + s.requests.filter((r) => r.path === '/api/chat').length, 0)

/**
 * Two conversations with long system prompts, `turns` turns each, sent in turns: each turn both,
 * the second once the first has reached its server (A first on odd turns, B on even: a scheduler
 * blind to prefixes puts each on the other server every turn), each conversation through the
 * replicas alternately.
 */
async function converse (t: Test, affinityEntries: number, turns = 5): Promise<{ computed: number, routes: string[][], assignments: string[][], fleet: TestFleet, replicas: Gateway[] }> {
  const { fleet, replicas } = await fleetOf(t, affinityEntries)
  await until(() => fleet.upstreams.every((s) => s.polls.length > 0), 'the first polls')
  const seen: Array<Array<Record<string, string>>> = [[], []]
  const system = (name: string): Msg => ({ role: 'system', content: `You are agent ${name}. ` + `Here is the tool context of ${name}. `.repeat(150) })
  const convs: Msg[][] = [[system('A')], [system('B')]]
  for (let turn = 0; turn < turns; turn++) {
    const order = turn % 2 === 0 ? [0, 1] : [1, 0]
    const answers: Array<Promise<void>> = []
    for (const c of order) {
      convs[c].push({ role: 'user', content: `Question ${turn} of conversation ${c}?` })
      const gw = replicas[(turn + c) % 2]
      const before = chats(fleet)
      answers.push((async () => {
        // (1000 answer tokens, 100 ms: the first of the two is still on its server when the second arrives)
        const r = await client(gw, seen[c]).chat({ model: MODEL, messages: [...convs[c]], stream: false, options: { num_predict: 1000 } })
        convs[c].push({ role: 'assistant', content: r.message.content })
      })())
      await until(() => chats(fleet) > before, 'the request to reach its server')
    }
    await Promise.all(answers)
  }
  const computed = fleet.upstreams.reduce((n, s) => n + s.costs().computedPromptTokens, 0)
  return { computed, routes: seen.map((s) => s.map((h) => h.route)), assignments: seen.map((s) => s.map((h) => h.assignment)), fleet, replicas }
}

t.test('a conversation\'s turns through two replicas return to the server holding their prefix; prompt tokens computed drop', async (t) => {
  const on = await converse(t, 100_000)

  for (const c of [0, 1]) {
    t.equal(new Set(on.assignments[c]).size, 1, `conversation ${c} stays on one server`)
    t.same(on.routes[c].slice(1), on.routes[c].slice(1).map(() => 'affinity'), `conversation ${c}: every later turn by affinity`)
  }
  t.not(on.assignments[0][0], on.assignments[1][0], 'the two conversations on the two servers')
  const records = on.fleet.upstreams.flatMap((s) => s.costs().requests)
  t.equal(records.filter((r) => r.cacheSource === 'slot' && r.computedTokens < 40).length, 8, 'every later turn found its prefix in its server\'s slot: only its new message computed')
  const metrics = await scrape(on.replicas[0].url)
  const hits = metrics.find('maestro_affinity_total').filter((s) => s.labels.result === 'hit').reduce((n, s) => n + s.value, 0)
  t.ok(hits > 0, 'affinity hits counted')
  t.ok(metrics.find('maestro_prefill_tokens_saved_total').reduce((n, s) => n + s.value, 0) > 0, 'prefill saved counted')
  t.ok(metrics.find('maestro_schedule_decision_seconds_count').reduce((n, s) => n + s.value, 0) > 0, 'decision time observed')

  const off = await converse(t, 0)
  t.ok(off.assignments.some((a) => new Set(a).size > 1), 'without affinity the conversations change servers')
  t.comment(`prompt tokens computed: ${on.computed} with affinity, ${off.computed} without`)
  t.ok(on.computed < off.computed * 0.75, `affinity saves at least a quarter of the prompt tokens computed (${on.computed} vs ${off.computed})`)
})


t.test('busy holder: a long prompt waits for it, a short one takes the free server, and no wait passes AFFINITY_MAX_WAIT_MS', async (t) => {
  // prefill 1 ms per token: the long prompt's 2000 tokens take 2 s cold
  const { fleet, replicas } = await fleetOf(t, 100_000, { AFFINITY_MAX_WAIT_MS: 10_000 }, { ...COST, prefillMsPerToken: 1, ramCacheEntries: 4 })
  await until(() => fleet.upstreams.every((s) => s.polls.length > 0), 'the first polls')
  const [gw] = replicas
  const seen: Array<Record<string, string>> = []
  const ollama = client(gw, seen)
  // a long conversation (about 2000 tokens at chars/4) and a short one, each served once
  const long: Msg[] = [{ role: 'user', content: 'Summarise this log. ' + 'line of a long log '.repeat(420) }]
  const short: Msg[] = [{ role: 'user', content: 'hi' }]
  long.push({ role: 'assistant', content: (await ollama.chat({ model: MODEL, messages: long, stream: false, options: { num_predict: 4 } })).message.content })
  const holder = seen[0].assignment
  short.push({ role: 'assistant', content: (await ollama.chat({ model: MODEL, messages: short, stream: false, options: { num_predict: 4 } })).message.content })
  t.equal(seen[1].assignment, holder, 'both served by the same server while the other was free too (the same warm preference)')
  // the replica learns the model's service time from what it serves (a moving average): mostly short requests
  for (let i = 0; i < 6; i++) await ollama.chat({ model: MODEL, messages: short.slice(0, 1), stream: false, options: { num_predict: 1 } })
  const waitingNow = async (): Promise<number> => ((await (await fetch(`${gw.url}/gpu/status`)).json()) as { waiting: unknown[] }).waiting.length
  /** The holder busy for a while: the long conversation's own request (it goes to the holder by affinity) with a long answer (5000 tokens at 0.1 ms: 0.5 s). */
  const occupy = async (): Promise<{ done: () => boolean, ended: Promise<unknown> }> => {
    const before = fleet.upstreams.reduce((n, s) => n + s.running(), 0)
    let done = false
    const ended = client(gw, []).chat({ model: MODEL, messages: long, stream: false, options: { num_predict: 5000 } }).finally(() => { done = true })
    await until(() => fleet.upstreams.reduce((n, s) => n + s.running(), 0) > before, 'the occupant to run')
    return { done: () => done, ended }
  }

  // the holder busy: the long prompt's next turn waits for it (2 s of prefill to save)
  let busy = await occupy()
  const next = [...long, { role: 'user', content: 'And the errors?' }]
  const waited = ollama.chat({ model: MODEL, messages: next, stream: false, options: { num_predict: 4 } })
  await until(async () => await waitingNow() > 0 || busy.done(), 'the long turn to wait for its holder')
  t.notOk(busy.done(), 'it waited while the holder was busy')
  await waited
  t.same(seen[seen.length - 1], { assignment: holder, route: 'affinity' }, 'long prompt: waited for the server holding its prefix')
  await busy.ended

  // the holder busy again: the short prompt's next turn is not worth waiting for
  busy = await occupy()
  await ollama.chat({ model: MODEL, messages: [...short, { role: 'user', content: 'and?' }], stream: false, options: { num_predict: 4 } })
  t.notOk(busy.done(), 'answered while the holder was still busy')
  t.not(seen[seen.length - 1].assignment, holder, 'short prompt: the free server at once')
  t.equal(seen[seen.length - 1].route, 'warm')
  await busy.ended

  // never past AFFINITY_MAX_WAIT_MS: a replica that waits at most 100 ms, the holder busy for 0.5 s
  const impatient = await fleet.replica({ AFFINITY_MAX_WAIT_MS: 100, UPSTREAM_POLL_MS: 100 })
  busy = await occupy()
  const seen2: Array<Record<string, string>> = []
  const before = chats(fleet)
  const answered = client(impatient, seen2).chat({ model: MODEL, messages: [...long, { role: 'user', content: 'And the warnings?' }], stream: false, options: { num_predict: 4 } })
  await until(() => chats(fleet) > before || busy.done(), 'the request to reach a server')
  t.notOk(busy.done(), 'sent to a server while the holder was still busy')
  await answered
  t.not(seen2[0].assignment, holder, 'past its wait budget: the free server')
  await busy.ended
})
