/*
 * dpe-test/kafdrop (images/test-kafdrop): written for this test image, in place of Kafdrop's class of
 * the same name and constructor, which wraps a Confluent serializer (see ConfluentFormatUnavailable).
 */
package kafdrop.util;

public final class AvroMessageSerializer implements MessageSerializer {
  private static final String FORMAT = "AVRO";
  private final String topicName;

  public AvroMessageSerializer(String topicName, String schemaRegistryUrl, String schemaRegistryAuth) {
    this.topicName = topicName;
  }

  @Override
  public byte[] serializeMessage(String value) {
    throw new ConfluentFormatUnavailable(FORMAT, topicName);
  }
}
