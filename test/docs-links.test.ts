// The documentation checked against itself and the code: every relative link of README.md,
// CHANGELOG.md and docs/*.md reaches a file, every #anchor a heading (GitHub's slugs); every
// variable of the configuration schema is documented and in .env.template; every npm command the
// docs tell a reader to run is one package.json has.
import t from 'tap'
import { existsSync, readdirSync, readFileSync } from 'node:fs'
import { dirname, join, relative, resolve, sep } from 'node:path'
import { fileURLToPath } from 'node:url'
import { EnvSchema, ServerEnvSchema } from '../services/config/config.js'

const ROOT = fileURLToPath(new URL('..', import.meta.url))
const DOC_FILES = ['README.md', 'CHANGELOG.md', ...readdirSync(join(ROOT, 'docs')).filter((f) => f.endsWith('.md')).sort().map((f) => `docs/${f}`)]

/** A stretch of prose (a paragraph, a heading, a table) with its code spans taken out. */
interface Prose {
  line: number
  /** The text, each code span blanked out (so a `[a](b)` in code is no link). */
  text: string
  /** The contents of its code spans. */
  code: string[]
}

interface CodeBlock {
  line: number
  info: string
  lines: string[]
}

interface MarkdownFile {
  headings: Array<{ line: number, text: string }>
  prose: Prose[]
  blocks: CodeBlock[]
}

/** Takes the code spans out of `text` (CommonMark: a run of n backticks up to the next run of exactly n). */
function codeSpans (text: string): { text: string, code: string[] } {
  const code: string[] = []
  let out = ''
  let i = 0
  while (i < text.length) {
    if (text[i] !== '`') {
      out += text[i++]
      continue
    }
    let n = 0
    while (text[i + n] === '`') n++
    const fence = '`'.repeat(n)
    let close = text.indexOf(fence, i + n)
    while (close !== -1 && text[close + n] === '`') {
      let after = close
      while (text[after] === '`') after++
      close = text.indexOf(fence, after)
    }
    if (close === -1) {
      out += fence
      i += n
      continue
    }
    code.push(text.slice(i + n, close).trim())
    out += ' '.repeat(close + n - i)
    i = close + n
  }
  return { text: out, code }
}

function parseMarkdown (source: string): MarkdownFile {
  const file: MarkdownFile = { headings: [], prose: [], blocks: [] }
  const lines = source.split('\n')
  let block: CodeBlock | undefined
  let fence = ''
  let paragraph: { line: number, lines: string[] } | undefined
  const endParagraph = (): void => {
    if (paragraph != null) file.prose.push({ line: paragraph.line, ...codeSpans(paragraph.lines.join('\n')) })
    paragraph = undefined
  }
  lines.forEach((raw, index) => {
    const line = index + 1
    const trimmed = raw.trimStart()
    if (block != null) {
      if (trimmed.startsWith(fence) && trimmed.slice(fence.length).trim() === '') {
        file.blocks.push(block)
        block = undefined
      } else {
        block.lines.push(raw)
      }
      return
    }
    if (trimmed.startsWith('```') || trimmed.startsWith('~~~')) {
      endParagraph()
      fence = trimmed.slice(0, 3)
      block = { line, info: trimmed.slice(3).trim().toLowerCase(), lines: [] }
      return
    }
    const heading = /^#{1,6} (.*)$/.exec(raw)
    if (heading != null) {
      endParagraph()
      const text = heading[1].trim()
      file.headings.push({ line, text })
      file.prose.push({ line, ...codeSpans(text) })
      return
    }
    if (trimmed === '') {
      endParagraph()
      return
    }
    paragraph ??= { line, lines: [] }
    paragraph.lines.push(raw)
  })
  endParagraph()
  return file
}

/**
 * GitHub's anchor for a heading: its text as rendered (link text, no backticks or emphasis
 * marks), lower case, every character that is not a letter, a digit, a space, `-` or `_` dropped,
 * spaces turned into `-`; a repeated anchor gets `-1`, `-2`, ...
 */
function headingAnchors (headings: Array<{ text: string }>): Set<string> {
  const anchors = new Set<string>()
  for (const { text } of headings) {
    const base = slug(text)
    let anchor = base
    for (let n = 1; anchors.has(anchor); n++) anchor = `${base}-${n}`
    anchors.add(anchor)
  }
  return anchors
}

function slug (heading: string): string {
  return heading
    .replace(/\[([^\]]*)\]\([^)]*\)/g, '$1')
    .replace(/[`*]/g, '')
    .toLowerCase()
    .replace(/[^\p{L}\p{M}\p{N}\p{Pc} -]/gu, '')
    .replace(/ /g, '-')
}

interface Link {
  line: number
  target: string
}

/** Inline links and images `[text](target "title")`, and reference definitions `[label]: target`. */
function linksOf (file: MarkdownFile): Link[] {
  const links: Link[] = []
  for (const p of file.prose) {
    for (let at = p.text.indexOf(']('); at !== -1; at = p.text.indexOf('](', at + 2)) {
      let end = at + 2
      while (end < p.text.length && p.text[end] !== ')' && !/\s/.test(p.text[end])) end++
      links.push({ line: p.line + lineOffset(p.text, at), target: p.text.slice(at + 2, end) })
    }
    p.text.split('\n').forEach((text, i) => {
      const definition = /^ {0,3}\[[^\]]+\]: *(\S+)/.exec(text)
      if (definition != null) links.push({ line: p.line + i, target: definition[1] })
    })
  }
  return links
}

const lineOffset = (text: string, index: number): number => text.slice(0, index).split('\n').length - 1

const docs = new Map<string, MarkdownFile>()
function markdownAt (path: string): MarkdownFile {
  let file = docs.get(path)
  if (file == null) {
    file = parseMarkdown(readFileSync(join(ROOT, path), 'utf8'))
    docs.set(path, file)
  }
  return file
}

/** Why `target`, linked from `from`, does not resolve; undefined when it does. */
function brokenLink (from: string, target: string): string | undefined {
  if (/^[a-z][a-z0-9+.-]*:/i.test(target)) return undefined // http:, https:, mailto:
  if (target === '') return 'empty link'
  const hash = target.indexOf('#')
  const pathPart = decodeURIComponent(hash === -1 ? target : target.slice(0, hash))
  const anchor = hash === -1 ? undefined : decodeURIComponent(target.slice(hash + 1))
  let path = from
  if (pathPart !== '') {
    const absolute = resolve(ROOT, dirname(from), pathPart)
    path = relative(ROOT, absolute).split(sep).join('/')
    if (path.startsWith('..')) return 'outside the repository'
    if (!existsSync(absolute)) return 'no such file'
  }
  if (anchor === undefined) return undefined
  if (!path.endsWith('.md')) return `an anchor into ${path}, which is not Markdown`
  return headingAnchors(markdownAt(path).headings).has(anchor) ? undefined : `no heading #${anchor} in ${path}`
}

t.test('GitHub anchors: lower case, punctuation dropped, spaces to dashes, repeats numbered', async (t) => {
  t.equal(slug('High availability: Redis Sentinel, Redis Cluster, Kubernetes'), 'high-availability-redis-sentinel-redis-cluster-kubernetes')
  t.equal(slug('Try it without GPUs: `npm run demo`'), 'try-it-without-gpus-npm-run-demo')
  t.equal(slug('Inventory (MariaDB)'), 'inventory-mariadb')
  t.equal(slug('[0.2.0] - 2026-12-07'), '020---2026-12-07')
  t.equal(slug('API keys, priority and limits'), 'api-keys-priority-and-limits')
  t.same([...headingAnchors([{ text: 'Added' }, { text: 'Added' }, { text: 'Added' }])], ['added', 'added-1', 'added-2'])
})

t.test('every relative link and anchor of README.md, CHANGELOG.md and docs/ resolves', async (t) => {
  t.ok(DOC_FILES.length >= 10, `${DOC_FILES.length} files: ${DOC_FILES.join(', ')}`)
  let checked = 0
  for (const path of DOC_FILES) {
    const links = linksOf(markdownAt(path))
    checked += links.length
    const broken = links.flatMap(({ line, target }) => {
      const why = brokenLink(path, target)
      return why === undefined ? [] : [`${path}:${line} (${target}): ${why}`]
    })
    t.same(broken, [], `${path}: ${links.length} links`)
  }
  t.ok(checked >= 40, `${checked} links checked`)
})

t.test('a broken link or anchor is found', async (t) => {
  t.equal(brokenLink('README.md', 'docs/no-such-page.md'), 'no such file')
  t.equal(brokenLink('README.md', 'docs/operations.md#no-such-heading'), 'no heading #no-such-heading in docs/operations.md')
  t.equal(brokenLink('docs/api.md', '#lease-api'), undefined)
  t.equal(brokenLink('docs/api.md', '#lease-apis'), 'no heading #lease-apis in docs/api.md')
  t.equal(brokenLink('docs/api.md', '../../shared/CONTRACT.md'), 'outside the repository')
  t.equal(brokenLink('docs/api.md', 'https://example.com/x#y'), undefined)
  const parsed = parseMarkdown('See [a](x.md) and `[b](y.md)`.\n\n```sh\n[c](z.md)\n```\n\n[d]: w.md\n')
  t.same(linksOf(parsed).map((l) => l.target), ['x.md', 'w.md'], 'links in code are not links')
})

t.test('every variable of the configuration schema is in docs/configuration.md and .env.template', async (t) => {
  const variables = [...Object.keys(EnvSchema.properties), ...Object.keys(ServerEnvSchema.properties)]
  t.ok(variables.length > 30, `${variables.length} variables`)
  // Documented means a row of the table: the variable in its first cell, with a default and a meaning.
  const rows = readFileSync(join(ROOT, 'docs/configuration.md'), 'utf8').split('\n')
    .filter((l) => l.startsWith('| `'))
    .map((l) => l.split('|').map((cell) => cell.trim()))
  const documented = new Set(rows.filter((cells) => cells.length >= 5 && cells[2] !== '' && cells[3] !== '')
    .flatMap((cells) => codeSpans(cells[1]).code))
  t.same(variables.filter((v) => !documented.has(v)), [], 'every variable has a row in docs/configuration.md')
  const template = new Set(readFileSync(join(ROOT, '.env.template'), 'utf8').split('\n')
    .filter((l) => /^[A-Za-z_][A-Za-z0-9_]*=/.test(l)).map((l) => l.slice(0, l.indexOf('='))))
  t.same(variables.filter((v) => !template.has(v)), [], 'every variable has a line in .env.template')
})

/** npm's own commands the docs may give; any other `npm <x>` must be a script of package.json. */
const NPM_BUILTINS = new Set(['ci', 'install', 'i'])
/** Shortcuts that run the script of the same name. */
const NPM_SCRIPT_SHORTCUTS = new Set(['start', 'test', 'stop', 'restart'])

/** The npm commands of a shell line: `npm ci`, `npm start`, `npm run bench -- --only a` → ['ci', 'start', 'run bench']. */
function npmCommands (shell: string): string[] {
  const commands: string[] = []
  for (const line of shell.split('\n')) {
    const hash = line.search(/(^|\s)#/)
    const words = (hash === -1 ? line : line.slice(0, hash)).split(/\s+/).filter((w) => w !== '')
    words.forEach((word, i) => {
      if (word !== 'npm') return
      const command = words[i + 1] ?? ''
      commands.push(command === 'run' || command === 'run-script' ? `run ${words[i + 2] ?? ''}` : command)
    })
  }
  return commands
}

t.test('every npm command the docs give exists', async (t) => {
  const scripts = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { scripts: Record<string, string> }).scripts
  const unknown = (command: string): boolean => {
    if (command.startsWith('run ')) return !(command.slice(4) in scripts)
    if (NPM_SCRIPT_SHORTCUTS.has(command)) return !(command in scripts)
    return !NPM_BUILTINS.has(command)
  }
  t.same(npmCommands('npm ci && npm start   # starts npm test\nnpm run bench -- --only a'), ['ci', 'start', 'run bench'])
  let seen = 0
  for (const path of DOC_FILES) {
    const file = markdownAt(path)
    const shell = [
      ...file.blocks.filter((b) => ['sh', 'bash', 'shell', 'console'].includes(b.info)).map((b) => ({ line: b.line, text: b.lines.join('\n') })),
      ...file.prose.flatMap((p) => p.code.filter((c) => c.startsWith('npm ')).map((text) => ({ line: p.line, text })))
    ]
    const wrong = shell.flatMap(({ line, text }) => npmCommands(text).map((c) => { seen++; return c }).filter(unknown).map((c) => `${path}:${line}: npm ${c}`))
    t.same(wrong, [], `${path}: the npm commands it gives exist`)
  }
  t.ok(seen >= 10, `${seen} npm commands checked`)
})

t.test('the README is a front page that leads to every page of docs/', async (t) => {
  const readme = readFileSync(join(ROOT, 'README.md'), 'utf8')
  t.ok(readme.split('\n').length <= 250, 'at most 250 lines')
  const linked = new Set(linksOf(markdownAt('README.md')).map((l) => l.target.split('#')[0]))
  const pages = DOC_FILES.filter((f) => f !== 'README.md')
  t.same(pages.filter((f) => !linked.has(f)), [], 'every page is linked from the README')
})
