// The voting form and the results page in a real browser: Debian's Chromium driven by
// playwright-core, each page checked with axe-core. Run by the Rust test `browser::`, which
// starts the servers and passes their addresses; `node pages.mjs open|closed`.
//
//   open:   vote on a phone, change your mind, watch the live results follow, vote without
//           JavaScript, check your receipt;
//   closed: the form says the poll is closed and links to the results, which say it is final.
//
// Exits 1 with what failed.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { chromium } from "playwright-core";

const require = createRequire(import.meta.url);
const axeSource = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");
const ingest = process.env.INGEST_URL;
const tally = process.env.TALLY_URL;
const phase = process.argv[2];
const TIMEOUT = 15_000;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_BIN || "/usr/bin/chromium",
  headless: true,
  // No sandbox as root; no background traffic to hosts this machine cannot reach.
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync"],
});
const failures = [];

/** Runs axe on the page; every violation is a failure. */
async function accessible(page, name) {
  await page.addScriptTag({ content: axeSource });
  const result = await page.evaluate(async () => await globalThis.axe.run());
  for (const v of result.violations) {
    failures.push(`${name}: axe ${v.id} (${v.impact}): ${v.help} at ${v.nodes.map((n) => n.target).join(", ")}`);
  }
}

/** The page fits the phone's width: nothing to scroll sideways. */
async function fits(page, name) {
  const [content, viewport] = await page.evaluate(() => [document.documentElement.scrollWidth, window.innerWidth]);
  if (content > viewport) failures.push(`${name}: ${content} px wide on a ${viewport} px screen`);
}

async function expectText(page, text, name) {
  try {
    await page.getByText(text).first().waitFor({ timeout: TIMEOUT });
  } catch {
    failures.push(`${name}: never showed ${JSON.stringify(text)}; it showed: ${(await page.textContent("body")).trim().slice(0, 400)}`);
  }
}

/** Waits until `option`'s count on a results page reads `votes`. */
async function liveCount(page, option, votes, name) {
  try {
    await page.locator(`[data-option="${option}"] .votes`).filter({ hasText: new RegExp(`^${votes}$`) }).waitFor({ timeout: TIMEOUT });
  } catch {
    failures.push(`${name}: ${option} never reached ${votes} without a reload`);
  }
}

const phone = { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, deviceScaleFactor: 3 };

if (phase === "open") {
  const context = await browser.newContext(phone);
  const form = await context.newPage();
  await form.goto(ingest);
  await accessible(form, "voting page");
  await fits(form, "voting page");
  await form.getByRole("button", { name: "Cats" }).tap();
  await expectText(form, "Your vote: Cats", "vote");
  await expectText(form, "Your receipt:", "vote's receipt");

  const results = await context.newPage();
  await results.goto(tally);
  await accessible(results, "results page");
  await fits(results, "results page");
  await liveCount(results, "cats", 1, "live results");

  // A change of mind: the results page, left open, follows without a reload.
  await form.bringToFront();
  await form.getByRole("button", { name: "Dogs" }).tap();
  await expectText(form, "Your vote: Dogs", "change of mind");
  await liveCount(results, "dogs", 1, "live results after the change");
  await liveCount(results, "cats", 0, "live results after the change");
  await expectText(results, "100.0%", "percentages");

  // The receipt of the vote that counts says so.
  const check = form.getByRole("link", { name: "check it" });
  const receiptUrl = await check.getAttribute("href");
  const receipt = await context.newPage();
  for (let i = 0; i < 50; i++) {
    await receipt.goto(receiptUrl);
    if ((await receipt.textContent("body")).includes("the one counted for you")) break;
    await receipt.waitForTimeout(200);
  }
  await expectText(receipt, "This vote is the one counted for you.", "receipt page");
  await accessible(receipt, "receipt page");

  // Without JavaScript the form still works: it is a plain form post.
  const plain = await browser.newContext({ javaScriptEnabled: false });
  const noScript = await plain.newPage();
  await noScript.goto(ingest);
  await noScript.getByRole("button", { name: "Cats" }).click();
  await expectText(noScript, "Your vote: Cats", "vote without JavaScript");
  await liveCount(results, "cats", 1, "live results after the vote without JavaScript");
} else if (phase === "closed") {
  const context = await browser.newContext(phone);
  const form = await context.newPage();
  await form.goto(ingest);
  await expectText(form, "This poll is closed.", "closed form");
  if (await form.getByRole("button").count() > 0) failures.push("closed form: it still has buttons");
  await accessible(form, "closed voting page");
  await form.getByRole("link", { name: "See the results" }).tap();
  await expectText(form, "Final result", "final results");
  await accessible(form, "final results page");
} else {
  failures.push(`unknown phase ${JSON.stringify(phase)}: open or closed`);
}

await browser.close();
if (failures.length > 0) {
  console.error(failures.join("\n"));
  process.exit(1);
}
console.log(`browser ${phase}: every check passed`);
