// The simulated Ollama's cost model: prompt tokens, the prompt cache (slots + RAM), loads with
// eviction, the internal FIFO, and the counts Ollama reports on its final line and in usage.
// Times are asserted from the simulator's own reported durations, never from wall clocks.
import t, { type Test } from 'tap'
import { Ollama } from 'ollama'
import OpenAI from 'openai'
import {
  answerTokens, chatTurns, ModelRunners, PromptCache, renderPrompt, responsesTurns, tokenize
} from '../scripts/simulator/ollama-costs.js'
import { startSimulator, type Simulator } from './helpers/upstream-simulator.js'

type Msg = { role: string, content: string }

const SYSTEM = 'You are a careful assistant. Answer in one short sentence, and cite nothing.'
const user = (content: string): Msg => ({ role: 'user', content })

/** Polls until `cond` holds (the simulator records requests as they arrive). */
async function until (cond: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 10_000
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise(resolve => setImmediate(resolve))
  }
}

t.test('tokens: deterministic, cut at word and 4-character boundaries, compositional', async (t) => {
  t.same(tokenize('Hello wonderful world'), ['Hell', 'o', ' won', 'derf', 'ul', ' wor', 'ld'])
  t.same(tokenize('a  b\nc'), ['a', '  b', '\nc'])
  t.same(tokenize('Hello wonderful').concat(tokenize(' world')), tokenize('Hello wonderful world'), 'cut before a word: same tokens')
  const prompt = renderPrompt(chatTurns([user('Why is the sky blue?')], SYSTEM))
  t.equal(prompt[0], '<|system|>')
  t.equal(prompt[prompt.length - 1], '<|assistant|>', 'the answer follows the assistant marker')
  const answer = answerTokens(prompt, 7)
  t.equal(answer.length, 7)
  t.same(answerTokens(prompt, 7), answer, 'same prompt, same answer')
  t.same(tokenize(answer.join('')), answer, 'the answer sent back as text is the same tokens')
  t.notSame(answerTokens(renderPrompt(chatTurns([user('Something else entirely')])), 7), answer, 'another conversation, another answer')
  t.same(responsesTurns('hi', 'be brief'), [{ role: 'system', content: 'be brief' }, { role: 'user', content: 'hi' }])
  t.same(renderPrompt(chatTurns([{ role: 'user', content: [{ type: 'text', text: 'hi' }] }])), ['<|user|>', 'hi', '<|end|>', '<|assistant|>'], 'content parts: their text')
})

t.test('prompt cache: the next turn computes only its new tokens; LRU RAM cache; reload from RAM', async (t) => {
  const cache = new PromptCache(1, 1)
  const convA = [user('Tell me about the moon and its phases, please.')]
  const a1 = renderPrompt(chatTurns(convA, SYSTEM))
  const first = cache.claim(a1)
  t.same(first, { slot: 0, cached: 0, source: 'none' }, 'cold: nothing cached')
  const answerA = answerTokens(a1, 5)
  cache.release(first.slot, [...a1, ...answerA])

  const convA2 = [...convA, { role: 'assistant', content: answerA.join('') }, user('And the tides?')]
  const a2 = renderPrompt(chatTurns(convA2, SYSTEM))
  const second = cache.claim(a2)
  t.equal(second.source, 'slot')
  t.equal(second.cached, a1.length + answerA.length, 'prompt + answer of the last turn come from the slot')
  t.ok(a2.length - second.cached < a2.length / 2, 'only the new message is computed')
  cache.release(second.slot, [...a2, ...answerTokens(a2, 5)])

  const again = cache.claim(a2)
  t.equal(again.cached, a2.length - 1, 'the same prompt again: all but the last token cached')
  cache.release(again.slot, [...a2, ...answerTokens(a2, 5)])

  // another conversation takes the one slot: A's state goes to RAM
  const b1 = renderPrompt(chatTurns([user('Write a haiku about autumn leaves.')]))
  const other = cache.claim(b1)
  t.equal(other.source, 'none')
  t.equal(other.cached, 0, 'no shared prefix with A (A starts with its system prompt)')
  cache.release(other.slot, [...b1, ...answerTokens(b1, 5)])
  t.equal(cache.snapshot().ram.length, 1, 'A kept in RAM')

  // A's next turn: its state is reloaded from RAM into the slot; B goes to RAM, evicting nothing else (1 entry)
  const back = cache.claim(a2)
  t.equal(back.source, 'ram')
  t.equal(back.cached, a2.length - 1)
  cache.release(back.slot, [...a2, ...answerTokens(a2, 5)])
  t.same(cache.snapshot().ram, [[...b1, ...answerTokens(b1, 5)]], 'B moved to RAM in its place')

  // a third conversation: A goes to RAM and evicts B (LRU, one entry); B comes back cold
  const c1 = renderPrompt(chatTurns([user('List three prime numbers.')]))
  cache.release(cache.claim(c1).slot, [...c1, ...answerTokens(c1, 5)])
  t.equal(cache.snapshot().ram.length, 1)
  const bAgain = cache.claim(b1)
  t.equal(bAgain.cached, 1, 'B was evicted from RAM: only the shared <|user|> marker is cached')
})

t.test('runners: a load on first use only, eviction at maxLoadedModels, FIFO past the slots', async (t) => {
  const runners = new ModelRunners({ numParallel: 1, loadMs: 5, maxLoadedModels: 1 })
  const dropped: string[] = []
  runners.onDrop = key => dropped.push(key)
  const a = await runners.acquire('a', 'a:latest', 4096)
  t.equal(a.loaded, true, 'first request loads')
  runners.release('a', a.runner, Infinity)
  const a2 = await runners.acquire('a', 'a:latest', 4096)
  t.equal(a2.loaded, false, 'resident: no load')
  runners.release('a', a2.runner, Infinity)
  const b = await runners.acquire('b', 'b:latest', 4096)
  t.equal(b.loaded, true)
  t.same(dropped, ['a'], 'one model resident: the idle one is evicted')
  t.same(runners.loads.map(l => l.model), ['a:latest', 'b:latest'])
  runners.release('b', b.runner, Infinity)
  const a3 = await runners.acquire('a', 'a:latest', 4096)
  t.equal(a3.loaded, true, 'loaded again after its eviction')
  t.same(dropped, ['a', 'b'])

  // a3 holds the only slot: three more wait and get it in arrival order
  const order: number[] = []
  const waiting = [1, 2, 3].map(async (n) => {
    const got = await runners.acquire('a', 'a:latest', 4096)
    order.push(n)
    return got
  })
  runners.release('a', a3.runner, Infinity)
  for (let i = 0; i < 3; i++) {
    await until(() => order.length === i + 1, `waiter ${i + 1}`)
    t.equal(runners.running(), 1, 'never more than the slots')
    runners.release('a', (await waiting[i]).runner, Infinity)
  }
  t.same(order, [1, 2, 3])
})

const COST = { prefillMsPerToken: 2, decodeMsPerToken: 1, slots: 1, ramCacheEntries: 2, loadMs: 40, maxLoadedModels: 1, answerTokens: 6 }

async function costed (t: Test): Promise<Simulator> {
  const sim = await startSimulator({ models: ['llama3.2', 'qwen3'], cost: COST })
  t.teardown(sim.close)
  return sim
}

t.test('HTTP (ollama client): the final line\'s counts, cache reuse across turns, loads and eviction', async (t) => {
  const sim = await costed(t)
  const ollama = new Ollama({ host: sim.url })
  const turn1 = [{ role: 'system', content: SYSTEM }, user('What is the capital of France, and why?')]
  const p1 = renderPrompt(chatTurns(turn1))

  const r1 = await ollama.chat({ model: 'llama3.2', messages: turn1, stream: false })
  const f1 = r1 as unknown as Record<string, number>
  t.equal(f1.load_duration, 40e6, 'a load on the first request')
  t.equal(f1.prompt_eval_count, p1.length, 'the whole prompt')
  t.notOk('prompt_eval_cached_count' in f1, 'no cached count when nothing was cached')
  t.equal(f1.prompt_eval_duration, p1.length * 2e6, 'every prompt token computed')
  t.equal(f1.eval_count, 6)
  t.equal(f1.eval_duration, 6e6)
  t.ok(f1.total_duration >= f1.load_duration + f1.prompt_eval_duration + f1.eval_duration)
  t.equal(r1.message.content, answerTokens(p1, 6).join(''), 'the deterministic answer')

  const turn2 = [...turn1, { role: 'assistant', content: r1.message.content }, user('Say it in French.')]
  const p2 = renderPrompt(chatTurns(turn2))
  const chunks = []
  for await (const part of await ollama.chat({ model: 'llama3.2', messages: turn2, stream: true, options: { num_predict: 3 } })) chunks.push(part)
  const f2 = chunks[chunks.length - 1] as unknown as Record<string, number>
  t.equal(chunks.length, 4, 'three tokens, then the final line')
  t.equal(f2.load_duration, 0, 'resident: no load')
  t.equal(f2.prompt_eval_count, p2.length, 'the whole prompt, cached tokens included')
  t.equal(f2.prompt_eval_cached_count, p1.length + 6, 'the last turn\'s prompt and answer came from the cache')
  t.equal(f2.prompt_eval_duration, (p2.length - f2.prompt_eval_cached_count) * 2e6, 'only the new tokens computed')
  t.equal(f2.eval_count, 3, 'num_predict')

  // generate: system + prompt; another model evicts llama3.2 (one model resident) and its cache
  const g = await ollama.generate({ model: 'qwen3', system: SYSTEM, prompt: 'Count to three.', stream: false })
  t.equal(g.load_duration, 40e6)
  t.equal(g.prompt_eval_count, renderPrompt([{ role: 'system', content: SYSTEM }, { role: 'user', content: 'Count to three.' }]).length)
  t.same(sim.unloads.map(u => u.model), ['llama3.2:latest'], 'llama3.2 evicted')

  const r3 = await ollama.chat({ model: 'llama3.2', messages: turn2, stream: false })
  const f3 = r3 as unknown as Record<string, number>
  t.equal(f3.load_duration, 40e6, 'loaded again after the eviction')
  t.notOk('prompt_eval_cached_count' in f3, 'its cache went with it')
  t.equal(r3.message.content, answerTokens(p2, 6).join(''))

  const stats = sim.costs()
  t.same(stats.loads, { 'llama3.2:latest': 2, 'qwen3:latest': 1 })
  t.equal(stats.requests.length, 4)
  t.equal(stats.cachedPromptTokens, p1.length + 6)
  t.equal(stats.computedPromptTokens, stats.requests.reduce((n, r) => n + r.promptTokens, 0) - stats.cachedPromptTokens)
  t.same(stats.requests.map(r => r.loadMs), [40, 0, 40, 40])
  t.same(stats.requests.map(r => r.cacheSource), ['none', 'slot', 'none', 'none'])
})

t.test('HTTP: the internal FIFO: three requests on one slot start in arrival order, TTFT grows', async (t) => {
  const sim = await costed(t)
  await fetch(`${sim.url}/api/generate`, { method: 'POST', body: JSON.stringify({ model: 'llama3.2', prompt: '', stream: false }) }) // load it first
  const answers: Array<Promise<Response>> = []
  for (const n of [1, 2, 3]) {
    const body = JSON.stringify({ model: 'llama3.2', messages: [user(`request number ${n} with a prompt of some length to prefill`)], stream: false, options: { num_predict: n } })
    answers.push(fetch(`${sim.url}/api/chat`, { method: 'POST', body }))
    await until(() => sim.requests.length === n + 1, `request ${n} to arrive`)
  }
  const finals = await Promise.all(answers.map(async (a) => await (await a).json() as Record<string, number>))
  t.same(finals.map(f => f.eval_count), [1, 2, 3])
  const records = sim.costs().requests
  t.same(records.map(r => r.evalCount), [1, 2, 3], 'slots given in arrival order')
  t.ok(records[0].startedAt <= records[1].startedAt && records[1].startedAt <= records[2].startedAt)
  t.ok(records[1].ttftMs > records[0].ttftMs && records[2].ttftMs > records[1].ttftMs, 'each waits for the ones before it')
  // each got the slot only after the one before had prefilled and decoded its answer
  for (const i of [1, 2]) {
    const before = records[i - 1]
    t.ok(records[i].startedAt >= before.startedAt + before.prefillMs + before.evalCount * COST.decodeMsPerToken - 1, `request ${i + 1} waited inside the server`)
    t.ok(records[i].ttftMs >= records[i].startedAt - records[i].arrivedAt + records[i].prefillMs, 'TTFT counts that wait')
  }
  t.ok(finals.every(f => f.load_duration === 0), 'already loaded')
})

t.test('HTTP (openai client, /v1/messages, /v1/responses): usage with cached tokens', async (t) => {
  const sim = await costed(t)
  const openai = new OpenAI({ baseURL: `${sim.url}/v1`, apiKey: 'x', maxRetries: 0 })
  const turn1 = [{ role: 'system' as const, content: SYSTEM }, { role: 'user' as const, content: 'Name a colour of the rainbow.' }]
  const p1 = renderPrompt(chatTurns(turn1))
  const c1 = await openai.chat.completions.create({ model: 'llama3.2', messages: turn1 })
  t.same(c1.usage, { prompt_tokens: p1.length, completion_tokens: 6, total_tokens: p1.length + 6, prompt_tokens_details: { cached_tokens: 0 } })
  const turn2 = [...turn1, { role: 'assistant' as const, content: c1.choices[0].message.content ?? '' }, { role: 'user' as const, content: 'Another one.' }]
  const p2 = renderPrompt(chatTurns(turn2))
  const stream = await openai.chat.completions.create({ model: 'llama3.2', messages: turn2, stream: true, stream_options: { include_usage: true } })
  let usage: OpenAI.CompletionUsage | undefined
  for await (const chunk of stream) if (chunk.usage != null) usage = chunk.usage
  t.same(usage, { prompt_tokens: p2.length, completion_tokens: 6, total_tokens: p2.length + 6, prompt_tokens_details: { cached_tokens: p1.length + 6 } }, 'streamed usage')

  // Anthropic Messages: the same conversation, its system prompt apart
  const answer2 = answerTokens(p2, 6).join('')
  const turn3 = [...turn2.slice(1), { role: 'assistant', content: answer2 }, { role: 'user', content: 'And one more.' }]
  const m = await (await fetch(`${sim.url}/v1/messages`, { method: 'POST', body: JSON.stringify({ model: 'llama3.2', max_tokens: 4, system: SYSTEM, messages: turn3 }) })).json() as { usage: Record<string, number> }
  t.same(m.usage, { input_tokens: renderPrompt(chatTurns(turn3, SYSTEM)).length, output_tokens: 4, cache_read_input_tokens: p2.length + 6 })

  const r = await (await fetch(`${sim.url}/v1/responses`, { method: 'POST', body: JSON.stringify({ model: 'llama3.2', instructions: SYSTEM, input: 'Name a colour of the rainbow.' }) })).json() as { usage: Record<string, unknown> }
  t.same(r.usage, { input_tokens: p1.length, output_tokens: 6, total_tokens: p1.length + 6, input_tokens_details: { cached_tokens: p1.length - 1 } }, 'a prefix of the slot\'s state: all but the last token cached')
})
