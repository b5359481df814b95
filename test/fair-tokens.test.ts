// Fair share by tokens end to end (CONTRACT 16.4), in both lease stores: two API keys keep one
// GPU backlogged through the gateway, one with prompts 10× longer; what each was served is counted
// from the simulator's own counts in the answers (prompt_eval_count + eval_count). The charge at
// admission is an estimate (the prompt, plus 256 output tokens when the body sets no limit): the
// simulator answers 3 tokens, so only the correction with the server's counts brings the shares
// within 1.5× (without it: about 2×, the short prompts paying 256 tokens they never get).
// A key back from idle is served in its turn, not ahead of the waiters already there.
import t from 'tap'
import { Ollama } from 'ollama'
import { startFleet, assertAllFree, type Gateway } from './helpers/gateway.js'
import { eventually, insertKey } from './helpers/api-keys.js'

const client = (gw: Gateway, secret: string): Ollama => new Ollama({ host: gw.url, headers: { Authorization: `Bearer ${secret}` } })

async function waiting (gw: Gateway): Promise<number> {
  const status = await (await fetch(gw.url + '/gpu/status')).json() as { waiting: Array<{ depth: number }> }
  return status.waiting.reduce((sum, q) => sum + q.depth, 0)
}

/** A prompt of about `tokens` estimated tokens (4 characters each), different for every request. */
const prompt = (tokens: number, n: number): string => `${n} `.padEnd(tokens * 4, 'word ')

for (const store of ['redis', 'memory'] as const) {
  t.test(`${store}: two keys backlogged on one GPU, prompts of ~200 and ~2,000 tokens, are served token totals within 1.5x; a key back from idle waits its turn`, async (t) => {
    const fleet = await startFleet(t, { gpus: [1], migrate: true, upstreams: [{ model: 'm', gpus: [0], simulator: { tokens: 3, tokenDelayMs: 1 } }] })
    await insertKey(fleet.db.query, 'short', 'secret-short')
    await insertKey(fleet.db.query, 'long', 'secret-long')
    await insertKey(fleet.db.query, 'late', 'secret-late')
    const gw = await fleet.replica(store === 'memory' ? { LEASE_STORE: 'memory' } : {})
    const late = client(gw, 'secret-late')
    // the late key was served once before: its counter is far behind by the time it comes back
    await late.generate({ model: 'm', prompt: prompt(50, 0) })

    const served: Array<{ key: string, tokens: number }> = []
    let stopping = false
    const TOTAL = 40_000
    const keys = [{ key: 'short', tokens: 200 }, { key: 'long', tokens: 2000 }]
    const loops = keys.flatMap(({ key, tokens }) => Array.from({ length: 4 }, async (_, c) => {
      const ollama = client(gw, `secret-${key}`)
      for (let n = 1; !stopping; n++) {
        const answer = await ollama.generate({ model: 'm', prompt: prompt(tokens, c * 10_000 + n) })
        if (stopping) break
        served.push({ key, tokens: answer.prompt_eval_count + answer.eval_count })
        if (served.reduce((sum, s) => sum + s.tokens, 0) >= TOTAL) stopping = true
      }
    }))
    // both backlogged (each key's 4 loops keep requests waiting): the late key comes back once
    t.ok(await eventually(async () => await waiting(gw) >= 4 && served.length >= 10, 10_000), 'both keys backlogged')
    const before = served.length
    // (a long prompt: its tag lies past every short waiter's; with credit banked it would go next)
    const lateAnswer = late.generate({ model: 'm', prompt: prompt(2000, 1) }).then(() => served.length)
    await Promise.all(loops)
    const lateAt = await lateAnswer

    const tokens = (key: string): number => served.filter((s) => s.key === key).reduce((sum, s) => sum + s.tokens, 0)
    const ratio = Math.max(tokens('short'), tokens('long')) / Math.max(1, Math.min(tokens('short'), tokens('long')))
    t.comment(`${store}: short ${tokens('short')} tokens in ${served.filter((s) => s.key === 'short').length} requests, long ${tokens('long')} in ${served.filter((s) => s.key === 'long').length}`)
    t.ok(ratio <= 1.5, `served token totals within 1.5x (ratio ${ratio.toFixed(2)})`)
    // the one running when it came counts once: the rest were waiting, and went first
    t.ok(lateAt - before >= 3, `the key back from idle waited its turn: ${lateAt - before} answers of the others came first`)
    await assertAllFree(t, gw)
  })
}
